"""The one path layer for every user path (workdir, checkpoints, TensorBoard, previews, vocabularies,
T5 checkpoints, embeddings, stage directories, bundles, FID workdirs): local or `gs://`.

`path(p)` is an `etils.epath.Path`, the layer orbax itself uses, so a workdir string means the
same place to us and to orbax/tensorstore. gs:// goes through fsspec/gcsfs (google-cloud-storage
credentials; `STORAGE_EMULATOR_HOST` for an emulator), never through tf.io.gfile: TensorFlow may
be absent outside `data/`, and its GCS client cannot be pointed at an emulator.
"""
import contextlib
import os
import shutil
import tempfile
import uuid

# Read by epath on its first gs:// access (cached afterwards), so it must be set at import.
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402


class PathError(ValueError):
    pass


def path(p) -> epath.Path:
    if isinstance(p, epath.Path):
        return p
    return epath.Path(os.fspath(p))


def is_remote(p) -> bool:
    return "://" in os.fspath(p)


def join(p, *parts) -> str:
    """A string path (local or gs://) joined with parts."""
    return os.fspath(path(p).joinpath(*parts))


def absolute(p) -> str:
    """gs:// paths unchanged; local ones made absolute (orbax needs absolute paths)."""
    p = os.fspath(p)
    return p if is_remote(p) else os.path.abspath(p)


def exists(p) -> bool:
    return path(p).exists()


def isdir(p) -> bool:
    return path(p).is_dir()


def isfile(p) -> bool:
    q = path(p)
    return q.exists() and not q.is_dir()


def makedirs(p):
    path(p).mkdir(parents=True, exist_ok=True)


def listdir(p):
    return sorted(c.name for c in path(p).iterdir())


def read_bytes(p) -> bytes:
    return path(p).read_bytes()


def read_text(p) -> str:
    return path(p).read_text()


def write_bytes(p, data: bytes):
    """Atomic: readers see the old file or the new one. A GCS object upload is atomic by itself;
    a local file is written beside its target, flushed to disk, then renamed (a crash leaves at
    most a stray `.NAME.tmp-*` sibling, never a truncated file under the real name)."""
    q = path(p)
    if is_remote(p):
        q.write_bytes(data)
        return
    tmp = q.parent / f".{q.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, q)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_npz(p, arrays):
    """`np.savez(p, **arrays)` through write_bytes (atomic), creating a local parent directory."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    if not is_remote(p):
        path(p).parent.mkdir(parents=True, exist_ok=True)
    write_bytes(p, buf.getvalue())


def write_text(p, text: str):
    write_bytes(p, text.encode("utf-8"))


def rmtree(p):
    q = path(p)
    if q.exists():
        q.rmtree()


def copy_tree(src, dst):
    """Copies a directory tree between any two places (local -> gs:// for staged outputs)."""
    src, dst = path(src), path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            copy_tree(child, dst / child.name)
        else:
            (dst / child.name).write_bytes(child.read_bytes())


def check_bucket(p):
    """For a gs:// path: the bucket exists and the credentials may use it, else one clear
    PathError (before any work or any write). Local paths pass."""
    p = os.fspath(p)
    if not p.startswith("gs://"):
        return
    bucket = p[len("gs://"):].split("/", 1)[0]
    if not bucket:
        raise PathError(f"{p}: no bucket name in the gs:// path")
    import gcsfs

    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        import google.auth

        try:
            google.auth.default()
        except google.auth.exceptions.DefaultCredentialsError as e:
            raise PathError(f"{p}: no Google Cloud credentials ({str(e).splitlines()[0][:200]}); run "
                            "`gcloud auth application-default login`, or run on a TPU VM with a service "
                            "account") from None
    try:
        fs = gcsfs.GCSFileSystem(skip_instance_cache=True)
        ok = fs.exists(bucket)
    except Exception as e:  # google.auth raises its own kinds for missing/invalid credentials
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise PathError(f"{p}: cannot reach bucket gs://{bucket} ({type(e).__name__}: {msg}); check the "
                        "credentials (gcloud auth application-default login, or the TPU VM's service "
                        "account)") from None
    if not ok:
        raise PathError(f"{p}: bucket gs://{bucket} does not exist (create it with "
                        f"`gcloud storage buckets create gs://{bucket}`) or these credentials cannot see it")


def list_files(p) -> list:
    """Every file under directory p, as sorted '/'-separated paths relative to p."""
    out = []
    for child in path(p).iterdir():
        if child.is_dir():
            out += [f"{child.name}/{f}" for f in list_files(child)]
        else:
            out.append(child.name)
    return sorted(out)


_MIRRORS = {}


def local_dir(p, files=None) -> str:
    """A local directory holding a copy of directory p (p itself when local), for readers that
    need local files (safetensors' memory maps, positioned reads). A gs:// directory is downloaded
    once per process into a temporary directory that is removed at exit. `files` (relative paths,
    as `list_files` gives them) copies only those: a model repository's unused variants can be
    larger than the weights that are read."""
    p = os.fspath(p)
    if not is_remote(p):
        return p
    key = (p.rstrip("/"), None if files is None else tuple(sorted(files)))
    if key not in _MIRRORS:
        import atexit

        d = tempfile.mkdtemp(prefix="imagen_jax_mirror_")
        atexit.register(shutil.rmtree, d, ignore_errors=True)
        if files is None:
            copy_tree(key[0], d)
        else:
            for rel in key[1]:
                target = os.path.join(d, *rel.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                # Streamed: one shard of a large T5 is several GB.
                with path(join(key[0], *rel.split("/"))).open("rb") as src, open(target, "wb") as f:
                    shutil.copyfileobj(src, f, 1 << 24)
        _MIRRORS[key] = d
    return _MIRRORS[key]


def upload_tree(local, dst, *, last=()):
    """Copies local directory `local` to `dst` (any place), the files named in `last` (relative
    paths: the completion markers readers look for) after everything else."""
    src = path(local)
    files = sorted(os.path.relpath(os.path.join(d, n), local) for d, _, ns in os.walk(local) for n in ns)
    for rel in [f for f in files if f not in last] + [f for f in files if f in last]:
        target = path(dst).joinpath(*rel.split(os.sep))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((src / rel).read_bytes())


@contextlib.contextmanager
def local_file(p):
    """A local file path holding p's bytes, for libraries that only open local files
    (safetensors, sentencepiece's trainer); the path itself when p is local."""
    if not is_remote(p):
        yield os.fspath(p)
        return
    d = tempfile.mkdtemp(prefix="imagen_jax_")
    try:
        local = os.path.join(d, path(p).name)
        with open(local, "wb") as f:
            f.write(read_bytes(p))
        yield local
    finally:
        shutil.rmtree(d, ignore_errors=True)


__all__ = ["PathError", "absolute", "check_bucket", "copy_tree", "exists", "is_remote", "isdir", "isfile",
           "join", "list_files", "listdir", "local_dir", "local_file", "makedirs", "path", "read_bytes", "read_text",
           "rmtree", "upload_tree", "write_bytes", "write_text"]
