"""Self-contained inference bundles of one cascade stage: the parameters as safetensors, the stage
config, the text vocabulary and a manifest with checksums. `imagen_jax.export` writes them;
`load` reads them back straight into shardings, and everything that accepts a training workdir
(`cascade.load_stage`, `imagen_jax.sample`) accepts a bundle.

Layout of BUNDLE/:

    info.json                       manifest (written last): source, step, params kind, dtype,
                                    parameter count, versions, creation time, sha256 of every file
    config.json                     the full stage config; text.vocab is relative to the bundle
    model.safetensors               one file, or for large models
    model-00001-of-0000N.safetensors + model.safetensors.index.json (weight_map: name -> file)
    vocab/<name>.model              the SentencePiece vocabulary of the text encoder

Parameter names are the '/'-joined Flax paths, e.g. 'down0_res0/conv1/kernel'. Each parameter lies
whole in one file; tensors in a file are sorted by name and the file's bytes depend only on the
parameter values, the dtype, the params kind (header metadata) and the shard limit, not on the mesh
or the number of hosts.

Dtype: parameters are stored in the exported dtype (bfloat16 or float32) and `load` returns them in
that dtype; the U-Net still computes in its config's `model.dtype` (Flax layers promote a bfloat16
weight to a float32 computation), so a bfloat16 bundle gives exactly the outputs of the float32
parameters rounded to bfloat16.

Sharded and multi-host export: nothing ever holds the whole model on one host. Parameters are
visited one at a time; each process writes, with positioned writes into the pre-sized files, only
the slices held by its own devices with replica_id 0 (over all processes these slices partition
every parameter exactly once). On one host a parameter is first assembled from its shards (one
parameter in host memory at a time) and written with one write. With several processes the bundle
path must be on a file system that every host sees; process 0 creates the files, the config and the
vocabulary, every process writes its slices, and after a barrier process 0 checksums the files,
writes the manifest and renames the directory.
"""
import datetime
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import uuid

import jax
import ml_collections
import ml_dtypes
import numpy as np
from flax import traverse_util

from imagen_jax import checkpoints, paths

FORMAT = "imagen_jax.bundle"
FORMAT_VERSION = 1
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 << 30
PARAM_KINDS = {"ema": "ema_params", "raw": "params"}
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16",
              np.dtype(np.float64): "F64", np.dtype(np.int32): "I32", np.dtype(np.int64): "I64",
              np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}
_CHUNK = 1 << 22


class BundleError(ValueError):
    pass


# ------------------------------------------------------------------------------- names and layout
def flatten(params):
    """Flax params tree -> {'down0_res0/conv1/kernel': leaf}."""
    return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat):
    return traverse_util.unflatten_dict(flat, sep="/")


def shard_file_name(k, n):
    return SINGLE_FILE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def plan_files(entries, max_shard_bytes):
    """Splits [(name, shape, dtype)] (in name order) into files of at most `max_shard_bytes` of
    tensor data (a larger parameter gets a file of its own). Returns [(file, [entries])]."""
    groups, current, size = [], [], 0
    for e in entries:
        nbytes = math.prod(e[1]) * e[2].itemsize
        if current and size + nbytes > max_shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(e)
        size += nbytes
    if current or not groups:
        groups.append(current)
    return [(shard_file_name(k, len(groups)), g) for k, g in enumerate(groups)]


def safetensors_header(entries, metadata=None):
    """The header bytes (length prefix + space-padded JSON) of a file holding `entries` in order,
    and each tensor's (offset from the start of the file, nbytes)."""
    header, offsets, pos = {}, {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets[name] = (pos, nbytes)
        pos += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    prefix = struct.pack("<Q", len(blob)) + blob
    return prefix, {k: (len(prefix) + o, n) for k, (o, n) in offsets.items()}, pos


# ------------------------------------------------------------------------------- writing
def _starts(index, shape):
    """The first element of a shard along each dimension (shards are contiguous boxes)."""
    out = []
    for sl, dim in zip(index, shape):
        start, _, step = sl.indices(dim)
        if step != 1:
            raise BundleError(f"unsupported strided shard index {index}")
        out.append(start)
    return out


def _to_host(shard_data, dtype):
    x = np.asarray(shard_data)
    return np.ascontiguousarray(x.astype(dtype) if x.dtype != dtype else x)


def _bytes(x):
    """A zero-copy byte view of a C-contiguous array (memoryview refuses bfloat16 directly)."""
    return memoryview(x.reshape(-1).view(np.uint8))


def _pwrite_all(fd, data, offset):
    """os.pwrite, repeated until every byte is written (Linux writes at most ~2 GiB per call)."""
    view = memoryview(data)
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_block(fd, offset, block, starts, full_shape):
    """Writes `block` (C-contiguous, the slice at `starts` of a row-major tensor of `full_shape`
    stored at byte `offset` of file `fd`) with one positioned write per contiguous run."""
    nd = len(full_shape)
    bshape = block.shape
    if block.size == 0:
        return
    # Dimensions after the last partial one are whole, so each run spans them completely.
    k = max([j for j in range(nd) if bshape[j] != full_shape[j]], default=0)
    run = math.prod(bshape[k:]) if nd else 1
    strides = [math.prod(full_shape[j + 1:]) for j in range(nd)]
    rows = block.reshape(-1, run) if nd else block.reshape(1, 1)
    item = block.dtype.itemsize
    for r, lead in enumerate(np.ndindex(*bshape[:k])):
        elem = sum((starts[j] + lead[j]) * strides[j] for j in range(k)) + (starts[k] * strides[k] if nd else 0)
        _pwrite_all(fd, _bytes(rows[r]), offset + elem * item)


def write_param(fd, offset, arr, dtype, *, assemble=True):
    """Writes this process's part of the global array `arr`, cast to `dtype`, at `offset`: only
    its addressable shards with replica_id 0 are read, one at a time. With `assemble` and all
    shards local, the parameter is put together on the host and written at once."""
    shape = tuple(arr.shape)
    owned = [s for s in arr.addressable_shards if s.replica_id == 0]
    if assemble and arr.is_fully_addressable:
        buf = np.empty(shape, dtype)
        for s in owned:
            buf[s.index] = _to_host(s.data, dtype)
        _pwrite_all(fd, _bytes(buf), offset)
        return
    for s in owned:
        write_block(fd, offset, _to_host(s.data, dtype), _starts(s.index, shape), shape)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions():
    import flax
    import safetensors

    return {"jax": jax.__version__, "jaxlib": _jaxlib_version(),
            "flax": flax.__version__, "safetensors": safetensors.__version__, "imagen_jax": _imagen_version(),
            "python": sys.version.split()[0]}


def _jaxlib_version():
    try:
        import jaxlib
        return jaxlib.__version__
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def _imagen_version():
    """The package version, with the git commit of the source tree when there is one."""
    import importlib.metadata

    import imagen_jax

    try:
        version = importlib.metadata.version("imagen_jax")
    except importlib.metadata.PackageNotFoundError:
        version = getattr(imagen_jax, "__version__", "unknown")
    root = os.path.dirname(os.path.dirname(os.path.abspath(imagen_jax.__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            version += f"+git.{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def human_bytes(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _barrier(name):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _shared_token():
    token = np.int64(uuid.uuid4().int % (1 << 62))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        token = multihost_utils.broadcast_one_to_all(token)
    return f"{int(token):x}"


def find_vocab(config, workdir):
    """The SentencePiece file the stage's text conditioner uses: config.text.vocab, else (tiny
    random T5) WORKDIR/vocab/shapes_spm.model or the one WORKDIR/vocab/*.model; None when the
    conditioner needs none (precomputed embeddings) or the workdir has not trained one yet."""
    t = config.text
    if t.vocab:
        if not paths.isfile(t.vocab):
            raise BundleError(f"config.text.vocab {t.vocab} of {workdir} does not exist")
        return t.vocab
    if t.embeddings_dir or t.t5_checkpoint:
        return None
    vdir = paths.join(workdir, "vocab")
    preferred = paths.join(vdir, "shapes_spm.model")
    if paths.isfile(preferred):
        return preferred
    found = [n for n in paths.listdir(vdir) if n.endswith(".model")] if paths.isdir(vdir) else []
    if len(found) > 1:
        raise BundleError(f"{vdir} holds several vocabularies {found}; set config.text.vocab to the one to export")
    return paths.join(vdir, found[0]) if found else None


def _check_output(out, workdir, overwrite):
    real = (lambda p: p.rstrip("/")) if paths.is_remote(out) or paths.is_remote(workdir) else os.path.realpath
    out_abs, wd_abs = real(out), real(workdir)
    ckpt_abs = real(checkpoints.checkpoint_dir(workdir))
    if out_abs == wd_abs or wd_abs.startswith(out_abs + os.sep) or (out_abs + os.sep).startswith(ckpt_abs + os.sep):
        raise BundleError(f"output {out} overlaps the workdir {workdir} or its checkpoints; choose another path")
    if not (paths.exists(out) if paths.is_remote(out) else os.path.lexists(out)):
        return
    if not overwrite:
        raise BundleError(f"output {out} exists (pass --overwrite to replace it)")
    # Never delete something that is not a bundle: a mistyped path must not cost a directory.
    if not (is_bundle(out) or (paths.isdir(out) and not paths.listdir(out))):
        raise BundleError(f"output {out} exists and is not a bundle (no info.json); refusing to replace it")


def export(workdir, out, *, step=None, params="ema", dtype="bfloat16", overwrite=False,
           max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, mesh=None, progress=True, log=print, _assemble=True):
    """Writes the bundle of a workdir's checkpoint (latest or `step`) to `out`; returns its info.

    params: 'ema' (default) or 'raw'; dtype: 'bfloat16' or 'float32'. The checkpoint is restored
    onto `mesh` (default: all devices on the fsdp axis, so that each device holds a slice of every
    large parameter) and written parameter by parameter from the shards (see the module doc).
    The bundle is built in a hidden directory next to `out` and renamed at the end; an existing
    `out` is refused unless `overwrite` (then only a bundle or an empty directory is replaced).
    """
    from tqdm import tqdm

    from imagen_jax import cascade, parallel

    if params not in PARAM_KINDS:
        raise BundleError(f"params must be one of {sorted(PARAM_KINDS)}, got {params!r}")
    if dtype not in DTYPES:
        raise BundleError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if int(max_shard_bytes) <= 0:
        raise BundleError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if not paths.isdir(workdir):
        raise BundleError(f"workdir {workdir} does not exist")
    out = out.rstrip("/") or out
    # A gs:// bundle is built in a local directory and uploaded at the end (manifest last);
    # positioned writes need a local file, so with several processes each parameter is gathered
    # to process 0 (one parameter at a time) instead of every process writing its slices.
    remote = paths.is_remote(out)
    if remote:
        paths.check_bucket(out)
    _check_output(out, workdir, overwrite)
    try:
        config = checkpoints.load_config(workdir)
    except checkpoints.CheckpointError as e:
        raise BundleError(str(e)) from None
    steps = checkpoints.available_steps(workdir)
    if not steps:
        raise BundleError(f"no checkpoints in {checkpoints.checkpoint_dir(workdir)}: nothing to export")
    if step is not None and int(step) not in steps:
        raise BundleError(f"step {step} is not among the checkpoints of {workdir}: {steps}")
    vocab = find_vocab(config, workdir)

    if mesh is None:
        mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    abstract, shardings = cascade.param_shardings(config, mesh)
    try:
        tree, step = checkpoints.restore_params(workdir, abstract, shardings, step=step, which=PARAM_KINDS[params])
    except checkpoints.CheckpointError as e:
        raise BundleError(str(e)) from None

    flat = flatten(tree)
    out_dtype = DTYPES[dtype]

    def stored(x):
        return out_dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(x.dtype)

    entries = [(name, tuple(flat[name].shape), stored(flat[name])) for name in sorted(flat)]
    files = plan_files(entries, int(max_shard_bytes))
    n_params = sum(math.prod(shape) for _, shape, _ in entries)
    meta = {"format": FORMAT, "params": params}
    host0 = jax.process_index() == 0

    if remote:
        token = _shared_token()
        tmp = os.path.join(tempfile.gettempdir(), f"imagen_jax_bundle.partial-{token}")
    else:
        parent = os.path.dirname(os.path.abspath(out))
        base = os.path.basename(os.path.abspath(out))
        tmp = os.path.join(parent, f".{base}.partial-{_shared_token()}")
    gather = remote and jax.process_count() > 1
    try:
        # ---- process 0: directory, vocabulary, config and the pre-sized weight files with their
        # headers (everything that can fail for a reason other than I/O happens before the writes)
        layout = {}
        for fname, group in files:
            prefix, offsets, data_bytes = safetensors_header(group, meta)
            layout[fname] = offsets
            if host0:
                os.makedirs(tmp, exist_ok=True)
                with open(os.path.join(tmp, fname), "wb") as f:
                    f.write(prefix)
                    f.truncate(len(prefix) + data_bytes)
        if host0:
            _write_config(tmp, config, vocab)
        _barrier("bundle_files_created")

        # ---- every process: its slices, one parameter at a time
        total_bytes = sum(math.prod(s) * d.itemsize for _, s, d in entries)
        bar = tqdm(total=len(entries), desc="export", unit="param",
                   disable=not progress or not host0 or total_bytes < (64 << 20))
        for fname, group in files:
            fd = os.open(os.path.join(tmp, fname), os.O_WRONLY) if host0 or not gather else None
            try:
                for name, _, st_dtype in group:
                    if gather:
                        from jax.experimental import multihost_utils
                        full = np.asarray(multihost_utils.process_allgather(flat[name], tiled=True))
                        if host0:
                            _pwrite_all(fd, _bytes(np.ascontiguousarray(full.astype(st_dtype))),
                                        layout[fname][name][0])
                        del full
                    else:
                        write_param(fd, layout[fname][name][0], flat[name], st_dtype, assemble=_assemble)
                    bar.update(1)
                if fd is not None:
                    os.fsync(fd)
            finally:
                if fd is not None:
                    os.close(fd)
        bar.close()
        del tree, flat
        _barrier("bundle_params_written")

        # ---- process 0: index, checksums, manifest (last), rename
        if host0:
            if len(files) > 1:
                index = {"metadata": {"total_size": total_bytes, **meta},
                         "weight_map": {name: fname for fname, group in files for name, _, _ in group}}
                with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                    json.dump(index, f, indent=2)
            checksums = {}
            for dirpath, _, names in os.walk(tmp):
                for n in sorted(names):
                    p = os.path.join(dirpath, n)
                    checksums[os.path.relpath(p, tmp)] = {"sha256": sha256_file(p), "bytes": os.path.getsize(p)}
            info = {"format": FORMAT, "format_version": FORMAT_VERSION, "stage": config.stage,
                    "resolution": int(config.data.full_size or config.data.image_size),
                    "source_workdir": paths.absolute(workdir), "step": int(step), "params": params,
                    "param_count": int(n_params), "dtype": dtype, "weight_files": [f for f, _ in files],
                    "bundle_bytes": sum(v["bytes"] for v in checksums.values()), "versions": _versions(),
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "files": dict(sorted(checksums.items()))}
            notes = []
            if config.text.t5_checkpoint:
                notes.append(f"the T5 weights are not included: text.t5_checkpoint is {config.text.t5_checkpoint}")
            if config.text.embeddings_dir:
                notes.append(f"text embeddings are read from text.embeddings_dir {config.text.embeddings_dir}")
            if notes:
                info["notes"] = notes
            with open(os.path.join(tmp, "info.json"), "w") as f:
                json.dump(info, f, indent=2)
            if remote:
                paths.rmtree(out)  # _check_output allowed it: a bundle or an empty directory
                paths.upload_tree(tmp, out, last=("info.json",))
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                _replace(tmp, out)
    except BaseException:
        if host0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier("bundle_done")
    if not host0:
        info = json.loads(paths.read_text(paths.join(out, "info.json")))
    if log and host0:
        nfiles = len(info["weight_files"])
        log(f"exported {n_params} params ({params}, {dtype}) from step {step} to {out}: "
            f"{human_bytes(info['bundle_bytes'])} in {nfiles} file{'s' if nfiles > 1 else ''}")
    return info


def _write_config(tmp, config, vocab):
    """config.json with text.vocab pointing at the bundle's copy of the vocabulary."""
    bundle_config = ml_collections.ConfigDict(config.to_dict())
    vdir = os.path.join(tmp, "vocab")
    if vocab:
        os.makedirs(vdir, exist_ok=True)
        name = paths.path(vocab).name
        with open(os.path.join(vdir, name), "wb") as f:
            f.write(paths.read_bytes(vocab))
        bundle_config.text.vocab = os.path.join("vocab", name)
    elif not (config.text.embeddings_dir or config.text.t5_checkpoint):
        # The workdir never trained its demo vocabulary: train the same one (deterministic in
        # config.seed) into the bundle, as sampling from the workdir would have done.
        from imagen_jax import conditioning
        os.makedirs(vdir, exist_ok=True)
        conditioning.demo_vocab(os.path.join(vdir, "shapes_spm"), seed=int(config.seed))
        for extra in os.listdir(vdir):
            if not extra.endswith(".model"):
                os.remove(os.path.join(vdir, extra))
        bundle_config.text.vocab = os.path.join("vocab", "shapes_spm.model")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        f.write(bundle_config.to_json(indent=2))


def _replace(tmp, out):
    """Renames `tmp` to `out`; an existing `out` is moved aside first and deleted only afterwards."""
    old = None
    if os.path.lexists(out):
        old = os.path.join(os.path.dirname(tmp), os.path.basename(tmp).replace(".partial-", ".old-"))
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old:
            os.replace(old, out)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------- reading
def is_bundle(path):
    return paths.isfile(paths.join(path, "info.json"))


def read_info(path):
    p = os.path.join(path, "info.json")
    if not os.path.isfile(p):
        raise BundleError(f"{path} is not a bundle: no info.json in it")
    try:
        with open(p) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise BundleError(f"{p} is not readable JSON: {e}") from None
    if info.get("format") != FORMAT:
        raise BundleError(f"{p} is not an imagen_jax bundle manifest (format {info.get('format')!r})")
    if int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise BundleError(f"{path} has bundle format version {info['format_version']}; this code reads "
                          f"up to {FORMAT_VERSION}")
    return info


def verify_files(path, info=None):
    """Checks that every file of the manifest is present with its size and sha256."""
    info = info or read_info(path)
    for rel, want in info["files"].items():
        p = os.path.join(path, rel)
        if not os.path.isfile(p):
            raise BundleError(f"bundle {path} is incomplete: {rel} is missing")
        if os.path.getsize(p) != want["bytes"] or sha256_file(p) != want["sha256"]:
            raise BundleError(f"bundle {path}: checksum mismatch for {rel} (the file is corrupted or was "
                              f"modified; export the bundle again)")


def weight_map(path, info):
    """{parameter name: file} from the index, or from the single file's header."""
    files = info["weight_files"]
    if len(files) == 1:
        from safetensors import safe_open
        try:
            with safe_open(os.path.join(path, files[0]), framework="numpy") as h:
                return {k: files[0] for k in h.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise BundleError(f"bundle {path}: {files[0]} is not a readable safetensors file ({e})") from None
    p = os.path.join(path, INDEX_FILE)
    try:
        with open(p) as f:
            wm = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise BundleError(f"bundle {path}: {INDEX_FILE} is missing or unreadable ({e})") from None
    unknown = sorted(set(wm.values()) - set(files))
    if unknown:
        raise BundleError(f"bundle {path}: {INDEX_FILE} names files {unknown} that the manifest does not list")
    return wm


def load(path, mesh=None, *, shardings=None, verify=True):
    """Reads a bundle; returns (config, params, info).

    params is the Flax tree of jax.Arrays in the stored dtype, placed with `shardings` (a tree like
    the params, or one Sharding for all) or else with the stage's logical shardings on `mesh`
    (default: all devices on the data axis, i.e. replicated). Each device's slice is read from the
    safetensors file on its own (`get_slice`), so no host ever reads more than its devices hold.
    config.text.vocab points at the bundle's copy of the vocabulary. With `verify` the sha256 of
    every file is checked first (reads the whole bundle once).
    """
    import flax.linen as nn
    from safetensors import safe_open

    from imagen_jax import cascade, parallel
    from imagen_jax.models import UNetConfig, param_shapes

    path = os.path.abspath(paths.local_dir(path))  # a gs:// bundle is read from a local copy
    info = read_info(path)
    if verify:
        verify_files(path, info)
    else:
        for rel in info["files"]:
            if not os.path.isfile(os.path.join(path, rel)):
                raise BundleError(f"bundle {path} is incomplete: {rel} is missing")
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = ml_collections.ConfigDict(json.load(f))
    except (OSError, ValueError) as e:
        raise BundleError(f"bundle {path}: config.json is missing or unreadable ({e})") from None
    if config.text.vocab and not os.path.isabs(config.text.vocab):
        config.text.vocab = os.path.join(path, config.text.vocab)

    if shardings is None:
        if mesh is None:
            mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
        abstract, shardings = cascade.param_shardings(config, mesh)
    else:
        abstract = nn.meta.unbox(param_shapes(UNetConfig.from_dict(config.model.to_dict())))
    expected = flatten(abstract)
    wm = weight_map(path, info)
    missing, extra = sorted(set(expected) - set(wm)), sorted(set(wm) - set(expected))
    if missing or extra:
        raise BundleError(f"bundle {path} does not match its U-Net config: missing {missing[:5]}, "
                          f"unexpected {extra[:5]}")
    if isinstance(shardings, jax.sharding.Sharding):
        flat_sh = {k: shardings for k in expected}
    else:
        flat_sh = flatten(shardings)
        if set(flat_sh) != set(expected):
            raise BundleError(f"shardings tree does not match the parameters of bundle {path}")

    handles = {}
    try:
        for fname in sorted(set(wm.values())):
            try:
                handles[fname] = safe_open(os.path.join(path, fname), framework="numpy")
            except Exception as e:
                raise BundleError(f"bundle {path}: {fname} is not a readable safetensors file ({e})") from None
        flat = {}
        for name in sorted(expected):
            fname = wm[name]
            sl = handles[fname].get_slice(name)
            shape = tuple(sl.get_shape())
            if shape != tuple(expected[name].shape):
                raise BundleError(f"bundle {path}: {name} in {fname} has shape {shape}, the U-Net config "
                                  f"expects {tuple(expected[name].shape)}")

            def read(index, sl=sl):
                return np.asarray(sl[tuple(index)])

            flat[name] = jax.make_array_from_callback(shape, flat_sh[name], read)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return config, unflatten(flat), info


__all__ = ["BundleError", "export", "is_bundle", "load", "read_info", "verify_files", "flatten", "unflatten"]
