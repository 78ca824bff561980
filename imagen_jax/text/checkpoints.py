"""Readers for T5 encoder weights: T5X checkpoints and Hugging Face safetensors.

Every reader yields the same thing: a dict from T5X-layout keys
('token_embedder/embedding', 'encoder/layers_0/attention/query/kernel', ...) to an
`ArraySource` that knows the array's shape and dtype and can read any rectangular slice of
it *in T5X orientation*. Nothing is read until `materialize`, which builds the parameter
tree, optionally placing each slice straight onto its device.

Formats:
  * T5X legacy checkpoint directory: a msgpack `checkpoint` file whose leaves are either
    inline arrays (flax msgpack ext type) or tensorstore spec dicts that point, by a path
    relative to the checkpoint directory, at one zarr directory per array.
  * The T5X msgpack file itself (all arrays inline, as small checkpoints are written).
  * HF safetensors (`T5EncoderModel` / `T5ForConditionalGeneration` names), single file or
    sharded with `model.safetensors.index.json`; PyTorch Linear weights are [out, in], so
    kernels are transposed to T5X's [in, out].

Only `target/token_embedder` and `target/encoder` are looked at; optimizer state and the
decoder are never decoded or opened.
"""
from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import glob
import json
import logging
import os
import re
import threading
from typing import Any, Callable, Mapping

import jax
from flax import traverse_util
import msgpack
import numpy as np

log = logging.getLogger(__name__)

_CHECKPOINT_FILE = "checkpoint"  # T5X's msgpack file name inside checkpoint_N/
# Decoded chunks kept per checkpoint open (LRU): each device's slice of a sharded load touches the
# same chunks as its neighbours', and without a cache every slice re-read and re-decompressed them.
_CACHE_BYTES = 2 << 30
_HF_INDEX = "model.safetensors.index.json"
_HF_INDEX_FP16 = "model.safetensors.index.fp16.json"  # diffusers/HF fp16 variant of the shard set
_EXPECTED = ("a T5X checkpoint directory (checkpoint_N/ with a msgpack 'checkpoint' file), "
             "that msgpack file itself, or Hugging Face T5 safetensors "
             "(a *.safetensors file, model.safetensors.index.json, or a directory of them)")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or not a T5 1.1 encoder. Names the path."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path (or a file it refers to) does not exist."""


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """One parameter in a checkpoint, readable slice by slice, in T5X orientation."""

    key: str                      # T5X-layout key, e.g. 'encoder/layers_0/mlp/wo/kernel'
    shape: tuple[int, ...]
    dtype: np.dtype               # dtype as stored
    origin: str                   # where it lives, for error messages
    reader: Callable[[tuple[slice, ...]], np.ndarray]

    def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The slice `index` (a tuple of slices, one per dim; None: everything)."""
        index = _explicit_index(index, self.shape)
        try:
            out = np.asarray(self.reader(index))
        except CheckpointError:
            raise
        except Exception as e:  # tensorstore / safetensors / codec errors
            raise CheckpointError(f"{self.origin}: cannot read {self.key}: {_one_line(e)}") from None
        want = tuple(len(range(*s.indices(n))) for s, n in zip(index, self.shape))
        if out.shape != want:
            raise CheckpointError(f"{self.origin}: {self.key} slice has shape {out.shape}, "
                                  f"expected {want} (truncated or corrupt data?)")
        return out


def _explicit_index(index, shape) -> tuple[slice, ...]:
    if index is None:
        return tuple(slice(0, n) for n in shape)
    index = tuple(index)
    if len(index) != len(shape) or not all(isinstance(s, slice) for s in index):
        raise ValueError(f"index {index} is not one slice per dim of shape {shape}")
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _is_gcs(path: str) -> bool:
    return path.startswith("gs://")


def _split_gcs(path: str) -> tuple[str, str]:
    m = re.fullmatch(r"gs://([^/]+)/?(.*)", path, re.DOTALL)
    if m is None:
        raise CheckpointError(f"{path}: malformed gs:// path; expected gs://bucket/object")
    return m.group(1), m.group(2)


# --------------------------------------------------------------------------- dispatch


def open_encoder_arrays(path: str | os.PathLike) -> dict[str, ArraySource]:
    """Find the checkpoint format at `path` and list the T5 encoder arrays it holds.

    Returns {T5X key: ArraySource} for token_embedder and encoder parameters only. Raises
    CheckpointNotFoundError if `path` does not exist and CheckpointError if it is not a
    checkpoint of a T5 encoder.
    """
    path = os.fspath(path)
    if _is_gcs(path):
        return _remote_t5x_arrays(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such file or directory; expected {_EXPECTED}")
    if os.path.isdir(path):
        state = _orbax_state_dir(path)
        if state is not None:
            return _orbax_arrays(state)
        if os.path.isfile(os.path.join(path, _CHECKPOINT_FILE)):
            return _t5x_arrays(path)
        for index in (_HF_INDEX, _HF_INDEX_FP16):  # full precision first, as HF does without a variant
            if os.path.isfile(os.path.join(path, index)):
                return _hf_arrays_from_index(os.path.join(path, index))
        # The int8 (bitsandbytes) variant is not a float checkpoint; a full-precision file wins over
        # an fp16 variant lying beside it (diffusers downloads name variants model.fp16[-N-of-M]).
        shards = [f for f in sorted(glob.glob(os.path.join(path, "*.safetensors")))
                  if ".8bit." not in os.path.basename(f)]
        shards = [f for f in shards if not re.search(r"\.fp16[.-]", os.path.basename(f))] or shards
        if shards:
            return _hf_arrays(shards, path)
        steps = _t5x_steps(path)
        if steps:
            chosen = os.path.join(path, f"checkpoint_{steps[-1]}")
            log.info("%s: T5X model directory, loading its latest step %s", path, chosen)
            state = _orbax_state_dir(chosen)
            return _orbax_arrays(state) if state is not None else _t5x_arrays(chosen)
        found = sorted(os.listdir(path))[:8]
        hint = " (PyTorch .bin weights: convert them to safetensors)" if any(
            f.endswith(".bin") for f in found) else ""
        raise CheckpointError(f"{path}: directory is not a T5 checkpoint{hint}; expected {_EXPECTED}; "
                              f"found {found or 'nothing'}")
    if path.endswith(".safetensors"):
        return _hf_arrays([path], path)
    if path.endswith(".json"):
        return _hf_arrays_from_index(path)
    return _t5x_arrays(path)


def _t5x_steps(model_dir: str) -> list[int]:
    """Steps N of the finished checkpoint_N/ under a T5X model directory (local or gs://): legacy
    (a msgpack 'checkpoint' file) or orbax (state/_METADATA, T5X's default since use_orbax=True)."""
    from imagen_jax import paths

    steps = []
    for name in paths.listdir(model_dir):
        name = name.rstrip("/").rsplit("/", 1)[-1]
        m = re.fullmatch(r"checkpoint_(\d+)", name)
        d = paths.join(model_dir, name)
        if m and (paths.isfile(paths.join(d, _CHECKPOINT_FILE)) or _orbax_state_dir(d) is not None):
            steps.append(int(m.group(1)))
    return sorted(steps)


def _hf_files(names) -> list[str]:
    """Of a directory's file names, those the local HF reader reads: the JSON files (config, index)
    and the safetensors, without the int8 variant, and without fp16 ones beside full precision."""
    weights = [n for n in names if n.endswith(".safetensors") and ".8bit." not in n]
    if not weights:
        return []
    full = [n for n in weights if not re.search(r"\.fp16[.-]", n)]
    return sorted([n for n in names if n.endswith(".json")] + (full or weights))


def _remote_hf_arrays(path: str) -> dict[str, ArraySource]:
    """gs:// HF safetensors (a file, an index, or a directory of them), read from a local copy of
    what it needs: safetensors are read through memory-mapped local files."""
    from imagen_jax import paths

    path = path.rstrip("/")
    try:
        if paths.isdir(path):
            return open_encoder_arrays(paths.local_dir(path, _hf_files(paths.listdir(path))))
        parent, name = path.rsplit("/", 1)
        if not paths.isfile(path):
            raise CheckpointNotFoundError(f"{path}: no such file; expected {_EXPECTED}")
        files = {name} | ({"config.json"} if paths.isfile(paths.join(parent, "config.json")) else set())
        if name.endswith(".json"):
            try:
                files |= set(json.loads(paths.read_text(path))["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError):
                pass  # the local reader names what is wrong with the index
        return open_encoder_arrays(os.path.join(paths.local_dir(parent, files), name))
    except CheckpointError:
        raise
    except Exception as e:  # gcsfs / auth errors
        raise CheckpointError(f"{path}: cannot read: {_one_line(e)}") from None


def _remote_t5x_arrays(path: str) -> dict[str, ArraySource]:
    """gs://: a msgpack file, a checkpoint_N/ (legacy or orbax), a model directory (its latest step),
    or Hugging Face safetensors (staged to a local copy)."""
    from imagen_jax import paths

    name = path.rstrip("/").rsplit("/", 1)[-1]
    if name == _CHECKPOINT_FILE:
        return _t5x_arrays(path)
    if name.endswith((".safetensors", ".json")):
        return _remote_hf_arrays(path)
    try:
        if not paths.isdir(path):
            raise CheckpointNotFoundError(f"{path}: no such directory; expected {_EXPECTED}")
        state = _orbax_state_dir(path)
        if state is not None:
            return _orbax_arrays(state)
        if paths.isfile(paths.join(path, _CHECKPOINT_FILE)):
            return _t5x_arrays(path)
        if _hf_files(paths.listdir(path)):
            return _remote_hf_arrays(path)
        steps = _t5x_steps(path)
    except CheckpointError:
        raise
    except Exception as e:  # gcsfs / auth errors
        raise CheckpointError(f"{path}: cannot list: {_one_line(e)}") from None
    if not steps:
        raise CheckpointError(f"{path}: holds no T5X checkpoint_N/ (legacy or orbax); expected {_EXPECTED}")
    chosen = paths.join(path, f"checkpoint_{steps[-1]}")
    log.info("%s: T5X model directory, loading its latest step %s", path, chosen)
    state = _orbax_state_dir(chosen)
    return _orbax_arrays(state) if state is not None else _t5x_arrays(chosen)


# --------------------------------------------------------------------------- T5X, orbax layout

_ORBAX_METADATA = "_METADATA"


def _orbax_state_dir(path: str) -> str | None:
    """The orbax PyTree directory of a T5X checkpoint: checkpoint_N/state/ (T5X's item name),
    or `path` itself when it is one; None for anything else."""
    from imagen_jax import paths

    for d in (paths.join(path, "state"), path):
        if paths.isfile(paths.join(d, _ORBAX_METADATA)):
            return d
    return None


def _orbax_arrays(state_dir: str) -> dict[str, ArraySource]:
    """The encoder arrays of an orbax PyTree checkpoint written by T5X (PyTreeCheckpointHandler,
    use_ocdbt=True by default): _METADATA lists the tree; each array is a zarr array keyed
    '<dotted tree path>' inside the OCDBT key-value store (or its own directory without OCDBT).
    Only target/token_embedder and target/encoder arrays are opened; nothing else is read."""
    import tensorstore as ts

    from imagen_jax import paths

    meta_file = paths.join(state_dir, _ORBAX_METADATA)
    try:
        tree = json.loads(_read_bytes(meta_file)).get("tree_metadata", {})
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{meta_file}: not orbax checkpoint metadata ({_one_line(e)})") from None
    names = {}
    for entry in tree.values():
        parts = [str(k.get("key")) for k in entry.get("key_metadata", [])]
        if len(parts) >= 3 and parts[0] == "target" and parts[1] in ("token_embedder", "encoder"):
            names["/".join(parts[1:])] = ".".join(parts)
    if not names:
        raise CheckpointError(f"{state_dir}: orbax checkpoint without T5 encoder weights; expected "
                              "target/encoder/layers_N/... and target/token_embedder/embedding")
    if _is_gcs(state_dir):
        bucket, obj = _split_gcs(state_dir)
        base = {"driver": "gcs", "bucket": bucket, "path": obj.rstrip("/") + "/"}
    else:
        base = {"driver": "file", "path": os.path.abspath(state_dir) + "/"}
    ocdbt = paths.isfile(paths.join(state_dir, "manifest.ocdbt"))

    def kvstore(name):
        if ocdbt:
            return {"driver": "ocdbt", "base": base, "path": name}
        return {**base, "path": base["path"] + name}

    context = ts.Context({"cache_pool": {"total_bytes_limit": _CACHE_BYTES}})
    futures = {k: ts.open({"driver": "zarr", "kvstore": kvstore(n), "recheck_cached_data": "open"},
                          read=True, open=True, context=context)
               for k, n in names.items()}
    sources = {}
    for key, fut in futures.items():
        origin = f"{state_dir} [{names[key]}]"
        try:
            store = fut.result()
        except Exception as e:  # noqa: BLE001 -- newer orbax writes zarr v3
            try:
                store = ts.open({"driver": "zarr3", "kvstore": kvstore(names[key]), "recheck_cached_data": "open"},
                                read=True, open=True, context=context).result()
            except Exception:
                raise CheckpointError(f"{origin}: cannot open array: {_one_line(e)}") from None
        sources[key] = ArraySource(key, tuple(store.shape), np.dtype(store.dtype.numpy_dtype), origin,
                                   lambda index, s=store: s[index].read().result())
    return _check_t5_1_1(sources, state_dir)


# --------------------------------------------------------------------------- T5X


class _Ext:
    """A flax msgpack ext payload left undecoded until (unless) it is needed."""

    __slots__ = ("code", "data")

    def __init__(self, code: int, data: bytes):
        self.code, self.data = code, data


# flax.serialization's ext type codes (flax/serialization.py, _MsgpackExtType).
_EXT_NDARRAY, _EXT_NPSCALAR = 1, 3


def _decode_ext(ext: _Ext) -> np.ndarray:
    """Decode flax's ndarray ext: msgpack [shape, dtype name, raw C-order bytes]."""
    if ext.code not in (_EXT_NDARRAY, _EXT_NPSCALAR):
        raise ValueError(f"unsupported msgpack ext type {ext.code}")
    shape, dtype_name, buffer = msgpack.unpackb(ext.data, raw=True)
    name = dtype_name.decode() if isinstance(dtype_name, bytes) else dtype_name
    dtype = np.dtype(jax.numpy.bfloat16) if name == "bfloat16" else np.dtype(name)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _read_bytes(path: str) -> bytes:
    if _is_gcs(path):
        import tensorstore as ts

        bucket, obj = _split_gcs(path)
        try:
            kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket}).result()
            result = kv.read(obj).result()
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read from GCS: {_one_line(e)}") from None
        if result.state != "value":
            raise CheckpointNotFoundError(f"{path}: no such object; expected {_EXPECTED}")
        return bytes(result.value)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such file; expected {_EXPECTED}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None


def _t5x_arrays(path: str) -> dict[str, ArraySource]:
    if _is_gcs(path):
        is_file = path.rstrip("/").rsplit("/", 1)[-1] == _CHECKPOINT_FILE
    else:
        is_file = os.path.isfile(path)
    msgpack_file = path if is_file else path.rstrip("/") + "/" + _CHECKPOINT_FILE
    ckpt_dir = msgpack_file.rsplit("/", 1)[0] if "/" in msgpack_file else "."

    raw = _read_bytes(msgpack_file)
    try:
        # The ext hook keeps payloads as bytes: optimizer slots and the decoder are never decoded.
        tree = msgpack.unpackb(raw, ext_hook=_Ext, raw=False, strict_map_key=False)
    except Exception as e:
        raise CheckpointError(f"{msgpack_file}: not a T5X msgpack checkpoint ({_one_line(e)}); "
                              f"expected {_EXPECTED}") from None
    del raw
    if not isinstance(tree, dict):
        raise CheckpointError(f"{msgpack_file}: msgpack holds a {type(tree).__name__}, "
                              "not a T5X checkpoint dict")
    target = _t5x_target(tree)
    if not isinstance(target.get("encoder"), dict) or not target.get("encoder"):
        where = "target" if target is not tree else "top level"
        hint = " (a decoder-only model?)" if "decoder" in target else ""
        raise CheckpointError(
            f"{msgpack_file}: no T5 encoder weights{hint}; expected target/encoder/layers_N/... and "
            f"target/token_embedder/embedding, found {where} keys {sorted(map(str, target))[:8]}")

    leaves: dict[str, Any] = {}
    for top in ("token_embedder", "encoder"):
        if isinstance(target.get(top), dict):
            _flatten(target[top], top, leaves)
    sources: dict[str, ArraySource] = {}
    specs: dict[str, dict] = {}
    for key, leaf in leaves.items():
        origin = f"{msgpack_file} [{key}]"
        try:
            if isinstance(leaf, dict) and "driver" in leaf:
                specs[key] = _resolve_spec(leaf, ckpt_dir, msgpack_file, key)
                continue
            arr = _inline_array(leaf)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{origin}: cannot decode array: {_one_line(e)}") from None
        sources[key] = ArraySource(key, arr.shape, arr.dtype, origin,
                                   lambda index, a=arr: a[index])
    sources.update(_open_tensorstores(specs, msgpack_file))
    return _check_t5_1_1(_legacy_bfloat16(sources, tree.get("version"), msgpack_file), msgpack_file)


def _legacy_bfloat16(sources: dict[str, ArraySource], version, msgpack_file: str) -> dict[str, ArraySource]:
    """T5X before checkpoint version 3 wrote bfloat16 arrays as their uint16 bit patterns; read as
    numbers they are garbage (1.0 -> 16256.0), so they are reinterpreted, as T5X does. A uint16 array
    in a newer checkpoint has no such meaning for a T5 encoder and is refused."""
    out = {}
    for key, src in sources.items():
        if src.dtype == np.uint16:
            if not (isinstance(version, int) and version < 3):
                raise CheckpointError(f"{src.origin}: stored as uint16 in a T5X checkpoint of version {version!r}; "
                                      "only version < 3 stores bfloat16 that way")
            bf16 = np.dtype(jax.numpy.bfloat16)
            src = ArraySource(key, src.shape, bf16, src.origin, lambda index, r=src.reader: np.asarray(r(index)).view(bf16))
        out[key] = src
    return out


def _t5x_target(tree: dict) -> dict:
    opt = tree.get("optimizer")
    if isinstance(opt, dict) and isinstance(opt.get("target"), dict):
        return opt["target"]
    for key in ("target", "params"):
        if isinstance(tree.get(key), dict):
            return tree[key]
    return tree


def _is_leaf(node) -> bool:
    return not isinstance(node, dict) or "driver" in node or "__msgpack_chunked_array__" in node


def _flatten(node: dict, prefix: str, out: dict) -> None:
    for k, v in node.items():
        key = f"{prefix}/{k}"
        if _is_leaf(v):
            out[key] = v
        else:
            _flatten(v, key, out)


def _inline_array(leaf) -> np.ndarray:
    if isinstance(leaf, _Ext):
        return _decode_ext(leaf)
    if isinstance(leaf, dict) and "__msgpack_chunked_array__" in leaf:
        # flax splits inline arrays over 2**30 bytes into numbered flat chunks.
        order = sorted(leaf["chunks"], key=int)
        flat = np.concatenate([_decode_ext(leaf["chunks"][k]).reshape(-1) for k in order])
        shape = [leaf["shape"][k] for k in sorted(leaf["shape"], key=int)]
        return flat.reshape(shape)
    if isinstance(leaf, (int, float, np.ndarray, np.generic)):
        return np.asarray(leaf)
    raise ValueError(f"leaf of type {type(leaf).__name__} is neither an array nor a tensorstore spec")


def _resolve_spec(spec: dict, ckpt_dir: str, msgpack_file: str, key: str) -> dict:
    """Make T5X's relative, driver-agnostic spec absolute and openable here.

    T5X writes kvstore driver 'gfile' (or 'gcs' with a placeholder bucket) and a path
    relative to the checkpoint directory; where the checkpoint lives now decides the
    driver: 'file' for local paths, 'gcs' (with the real bucket) for gs:// paths.
    """
    spec = copy.deepcopy(spec)
    if isinstance(spec.get("metadata"), dict):
        # The array's own .zarray says how it is chunked and compressed; T5X drops these from the
        # spec as well, so a re-chunked or recompressed copy opens.
        spec["metadata"].pop("chunks", None)
        spec["metadata"].pop("compressor", None)
    # The arrays do not change while we read them: validate cached chunks once, at open, not on
    # every device slice (on GCS each revalidation is a request).
    spec["recheck_cached_data"] = "open"
    kvstore = spec.get("kvstore")
    rel = kvstore.get("path") if isinstance(kvstore, dict) else None
    if rel is None:
        rel = spec.pop("path", None)  # tensorstore < 0.1.14 put the path at the top level
    else:
        spec.pop("path", None)
    if not isinstance(rel, str):
        raise CheckpointError(f"{msgpack_file} [{key}]: tensorstore spec has no path: {spec}")
    full = rel if (_is_gcs(rel) or os.path.isabs(rel)) else ckpt_dir.rstrip("/") + "/" + rel
    if _is_gcs(full):
        bucket, obj = _split_gcs(full)
        spec["kvstore"] = {"driver": "gcs", "bucket": bucket, "path": obj}
    else:
        if not os.path.isdir(full):
            raise CheckpointNotFoundError(
                f"{msgpack_file} [{key}]: array directory {full} does not exist "
                "(expected a zarr directory written by T5X next to the msgpack file)")
        spec["kvstore"] = {"driver": "file", "path": full}
    return spec


def _open_tensorstores(specs: dict[str, dict], msgpack_file: str) -> dict[str, ArraySource]:
    if not specs:
        return {}
    import tensorstore as ts

    # Opening reads only the zarr metadata; all opens run concurrently.
    context = ts.Context({"cache_pool": {"total_bytes_limit": _CACHE_BYTES}})
    futures = {k: ts.open(s, read=True, open=True, context=context) for k, s in specs.items()}
    out = {}
    for key, fut in futures.items():
        where = specs[key]["kvstore"]
        origin = (f"gs://{where['bucket']}/{where['path']}" if where["driver"] == "gcs"
                  else where["path"])
        try:
            store = fut.result()
        except Exception as e:
            raise CheckpointError(f"{origin}: cannot open array {key} of {msgpack_file}: "
                                  f"{_one_line(e)}") from None
        out[key] = ArraySource(key, tuple(store.shape), np.dtype(store.dtype.numpy_dtype), origin,
                               lambda index, s=store: s[index].read().result())
    return out


# --------------------------------------------------------------------------- Hugging Face


def _hf_name_map(num_layers: int) -> dict[str, tuple[str, bool]]:
    """T5X key -> (HF tensor name, stored transposed?)."""
    names = {
        "token_embedder/embedding": ("shared.weight", False),
        "encoder/relpos_bias/rel_embedding":
            ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True),
        "encoder/encoder_norm/scale": ("encoder.final_layer_norm.weight", False),
    }
    for i in range(num_layers):
        t, h = f"encoder/layers_{i}/", f"encoder.block.{i}.layer."
        names.update({
            t + "pre_attention_layer_norm/scale": (h + "0.layer_norm.weight", False),
            t + "attention/query/kernel": (h + "0.SelfAttention.q.weight", True),
            t + "attention/key/kernel": (h + "0.SelfAttention.k.weight", True),
            t + "attention/value/kernel": (h + "0.SelfAttention.v.weight", True),
            t + "attention/out/kernel": (h + "0.SelfAttention.o.weight", True),
            t + "pre_mlp_layer_norm/scale": (h + "1.layer_norm.weight", False),
            t + "mlp/wi_0/kernel": (h + "1.DenseReluDense.wi_0.weight", True),
            t + "mlp/wi_1/kernel": (h + "1.DenseReluDense.wi_1.weight", True),
            t + "mlp/wo/kernel": (h + "1.DenseReluDense.wo.weight", True),
        })
    return names


def _hf_arrays_from_index(index_path: str) -> dict[str, ArraySource]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not a dict")
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{index_path}: no such file; expected {_EXPECTED}") from None
    except Exception as e:
        raise CheckpointError(f"{index_path}: not a safetensors index (a JSON with a 'weight_map' "
                              f"of tensor name -> file): {_one_line(e)}") from None
    base = os.path.dirname(index_path)
    files = sorted({os.path.join(base, f) for f in weight_map.values()})
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise CheckpointNotFoundError(f"{index_path}: shard file(s) listed in the index do not exist: "
                                      f"{missing[:3]}")
    return _hf_arrays(files, index_path)


def _hf_arrays(files: list[str], origin: str) -> dict[str, ArraySource]:
    from safetensors import safe_open

    tensors: dict[str, tuple[str, tuple[int, ...], np.dtype]] = {}
    for file in files:
        try:
            with safe_open(file, framework="numpy") as h:
                for name in h.keys():
                    sl = h.get_slice(name)
                    tensors[name] = (file, tuple(sl.get_shape()), _st_dtype(sl.get_dtype()))
        except Exception as e:
            raise CheckpointError(f"{file}: not a readable safetensors file: {_one_line(e)}") from None

    layer_ids = sorted({int(m.group(1)) for n in tensors
                        if (m := re.fullmatch(r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.q\.weight", n))})
    if not layer_ids:
        sample = sorted(tensors)[:5]
        hint = " (a decoder-only model?)" if any(n.startswith("decoder.") for n in tensors) else ""
        raise CheckpointError(f"{origin}: no T5 encoder tensors{hint}; expected names like "
                              f"encoder.block.0.layer.0.SelfAttention.q.weight, found {sample}")
    if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in tensors:
        raise CheckpointError(f"{origin}: a T5 1.0 checkpoint (ungated ReLU MLP 'DenseReluDense.wi'); "
                              "expected T5 1.1 (gated 'wi_0'/'wi_1')")
    names = _hf_name_map(max(layer_ids) + 1)
    if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
        names["token_embedder/embedding"] = ("encoder.embed_tokens.weight", False)
    missing = [n for n, _ in names.values() if n not in tensors]
    if missing:
        raise CheckpointError(f"{origin}: not a complete T5 1.1 encoder; missing tensors {missing[:4]}"
                              + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))

    sources = {}
    for key, (name, transposed) in names.items():
        file, shape, dtype = tensors[name]
        if transposed and len(shape) != 2:
            raise CheckpointError(f"{file}: tensor {name} has shape {shape}, expected a matrix")
        sources[key] = ArraySource(key, shape[::-1] if transposed else shape, dtype,
                                   f"{file} [{name}]", _hf_reader(file, name, transposed))
    return sources


def _hf_reader(file: str, name: str, transposed: bool):
    def read(index):
        from safetensors import safe_open

        with safe_open(file, framework="numpy") as h:
            if transposed:  # HF stores [out, in]; T5X wants [in, out]
                return np.ascontiguousarray(h.get_slice(name)[index[::-1]].T)
            return h.get_slice(name)[index]
    return read


def _st_dtype(name: str) -> np.dtype:
    table = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
             "BF16": jax.numpy.bfloat16, "I64": np.int64, "I32": np.int32}
    if name not in table:
        raise ValueError(f"unsupported safetensors dtype {name}")
    return np.dtype(table[name])


# --------------------------------------------------------------------------- checks


def _check_t5_1_1(sources: dict[str, ArraySource], origin: str) -> dict[str, ArraySource]:
    if any(k.endswith("/mlp/wi/kernel") for k in sources):
        raise CheckpointError(f"{origin}: a T5 1.0 checkpoint (ungated ReLU MLP 'mlp/wi'); "
                              "expected T5 1.1 (gated 'mlp/wi_0' and 'mlp/wi_1')")
    return sources


# --------------------------------------------------------------------------- hyperparameters

# The network in t5.py is T5 1.1's: gated GELU (tanh) MLP. What the arrays' shapes cannot say is read
# from the configuration stored with the checkpoint, where there is one:
#   Hugging Face: config.json beside the safetensors (feed_forward_proj / dense_act_fn, is_gated_act,
#     layer_norm_epsilon, relative_attention_num_buckets, relative_attention_max_distance);
#   T5X: the gin config T5X writes into the model directory (config.gin, in checkpoint_N/'s parent
#     or beside it): its mlp_activations (T5 1.1: ('gelu', 'linear')). T5X's network fixes the
#     layer-norm eps (1e-6) and relative-attention max distance (128) in code, so a gin cannot change them.
# Without a stored configuration (the published T5 1.1 checkpoints carry none) T5 1.1 is assumed.
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu")  # HF names of the tanh-approximated GELU T5 1.1 uses


def model_hyperparameters(path: str | os.PathLike) -> dict:
    """T5Config overrides read from the configuration stored with the checkpoint at `path` (see
    above); raises CheckpointError for a model this encoder does not implement (e.g. a ReLU or
    ungated MLP), naming the setting and the file. {} when nothing is stored."""
    from imagen_jax import paths

    path = os.fspath(path).rstrip("/")
    here = path if paths.isdir(path) else (path.rsplit("/", 1)[0] if "/" in path else ".")
    hf = paths.join(here, "config.json")
    if paths.isfile(hf):
        try:
            cfg = json.loads(paths.read_text(hf))
        except Exception as e:
            raise CheckpointError(f"{hf}: unreadable Hugging Face config ({_one_line(e)})") from None
        if isinstance(cfg, dict) and ("d_model" in cfg or "feed_forward_proj" in cfg):
            return _hf_hyperparameters(cfg, hf)
    candidates = [paths.join(here, "config.gin")]
    if "/" in here:
        candidates.append(paths.join(here.rsplit("/", 1)[0], "config.gin"))
    for gin in candidates:
        if paths.isfile(gin):
            _check_gin(paths.read_text(gin), gin)
            break
    return {}


def _hf_hyperparameters(cfg: dict, origin: str) -> dict:
    proj = str(cfg.get("feed_forward_proj", "gated-gelu"))
    gated = proj.startswith("gated-") or bool(cfg.get("is_gated_act", False))
    act = str(cfg.get("dense_act_fn") or proj.split("-")[-1])
    if act == "gelu" and proj == "gated-gelu":
        act = "gelu_new"  # transformers maps 'gated-gelu' to gelu_new (the tanh approximation)
    if not gated or act not in _GELU_TANH[:2]:
        raise CheckpointError(f"{origin}: feed_forward_proj={proj!r} (dense_act_fn={act!r}); this encoder "
                              "implements T5 1.1's gated tanh-GELU MLP only ('gated-gelu')")
    out = {}
    for key, field in (("layer_norm_epsilon", "layer_norm_eps"), ("relative_attention_num_buckets", "relpos_buckets"),
                       ("relative_attention_max_distance", "relpos_max_distance")):
        if cfg.get(key) is not None:
            out[field] = float(cfg[key]) if field == "layer_norm_eps" else int(cfg[key])
    return out


def _check_gin(text: str, origin: str) -> None:
    m = re.search(r"mlp_activations\s*=\s*[\(\[]([^\)\]]*)[\)\]]", text)
    if m is None:
        return
    acts = tuple(a.strip().strip("'\"") for a in m.group(1).split(",") if a.strip())
    if acts != ("gelu", "linear"):
        raise CheckpointError(f"{origin}: mlp_activations = {acts}; this encoder implements T5 1.1's "
                              "gated GELU MLP only (mlp_activations = ('gelu', 'linear'))")


# --------------------------------------------------------------------------- loading


def materialize(sources: Mapping[str, ArraySource], dtype, shardings=None) -> dict:
    """Read every source into a nested param tree of jax Arrays of `dtype`.

    shardings: None (default device), a Sharding for all, a callable
    (key, shape, dtype) -> Sharding, or a tree of Shardings matching the params. With a
    sharding, each device's slice is read separately (identical slices are read once), so
    the host never assembles a full copy of a sharded array.
    """
    dtype = np.dtype(dtype)

    def sharding_for(key: str, shape):
        if shardings is None or isinstance(shardings, jax.sharding.Sharding):
            return shardings
        if callable(shardings) and not isinstance(shardings, Mapping):
            return shardings(key, shape, dtype)
        node = shardings
        if set(node.keys()) == {"params"}:
            node = node["params"]
        for part in key.split("/"):
            if not isinstance(node, Mapping) or part not in node:
                raise ValueError(f"shardings tree has no entry for parameter {key!r}")
            node = node[part]
        return node

    def load(key: str) -> jax.Array:
        src = sources[key]
        sharding = sharding_for(key, src.shape)
        if sharding is None:
            return jax.device_put(src.read().astype(dtype, copy=False))
        cache: dict[tuple, np.ndarray] = {}
        lock = threading.Lock()

        def callback(index):
            index = _explicit_index(index, src.shape)
            k = tuple((s.start, s.stop, s.step) for s in index)
            with lock:
                if k not in cache:
                    cache[k] = np.ascontiguousarray(src.read(index).astype(dtype, copy=False))
                return cache[k]

        return jax.make_array_from_callback(src.shape, sharding, callback)

    keys = list(sources)
    # Reads are I/O and decompression that release the GIL: overlap them across arrays.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, max(1, len(keys)))) as pool:
        arrays = dict(zip(keys, pool.map(load, keys)))
    return traverse_util.unflatten_dict(arrays, sep="/")


# --------------------------------------------------------------------------- export


def _flat_params(params: Mapping) -> dict[str, np.ndarray]:
    if set(params.keys()) == {"params"}:
        params = params["params"]
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat["/".join(str(getattr(p, "key", p)) for p in path)] = np.asarray(leaf)
    return flat


def params_to_hf(params: Mapping) -> dict[str, np.ndarray]:
    """T5X-layout params -> HF T5EncoderModel state dict (numpy, [out, in] weights).

    Includes 'shared.weight'; HF ties 'encoder.embed_tokens.weight' to it.
    """
    flat = _flat_params(params)
    num_layers = len({k.split("/")[1] for k in flat if k.startswith("encoder/layers_")})
    out = {}
    for key, (name, transposed) in _hf_name_map(num_layers).items():
        if key not in flat:
            raise ValueError(f"params have no {key!r}; expected a T5X-layout T5 encoder tree")
        arr = flat[key]
        out[name] = np.ascontiguousarray(arr.T) if transposed else arr
    return out


def save_safetensors(params: Mapping, path: str | os.PathLike,
                     max_shard_bytes: int | None = None) -> list[str]:
    """Write params as HF T5 encoder safetensors; returns the files written.

    `path` ending in '.safetensors' gets one file; otherwise `path` is a directory that gets
    'model.safetensors', or, when the tensors exceed `max_shard_bytes`, numbered shards plus
    'model.safetensors.index.json' in HF's layout.
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    tensors = params_to_hf(params)
    if path.endswith(".safetensors"):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(tensors, path, metadata={"format": "pt"})
        return [path]
    os.makedirs(path, exist_ok=True)
    groups: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if max_shard_bytes and groups[-1] and size + arr.nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = arr
        size += arr.nbytes
    if len(groups) == 1:
        file = os.path.join(path, "model.safetensors")
        save_file(tensors, file, metadata={"format": "pt"})
        return [file]
    files, weight_map = [], {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, os.path.join(path, name), metadata={"format": "pt"})
        files.append(os.path.join(path, name))
        weight_map.update({t: name for t in group})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
             "weight_map": weight_map}
    with open(os.path.join(path, _HF_INDEX), "w") as f:
        json.dump(index, f, indent=2)
    return files + [os.path.join(path, _HF_INDEX)]
