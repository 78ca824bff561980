"""TextEncoder (prompts -> T5 embeddings, jitted and shardable) and the EmbeddingStore.

    enc = TextEncoder.from_checkpoint(t5_path, vocab_path, max_length=128, mesh=mesh)
    emb, mask = enc.encode(["a corgi on a skateboard", ...])   # [B, L, D], [B, L]

The EmbeddingStore is the on-disk cache written by `python -m imagen_jax.encode_text` so
training can skip the encoder: `EmbeddingStore(dir).lookup(captions) -> (emb, mask)`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imagen_jax.text import t5
from imagen_jax.text.tokenizer import T5Tokenizer


def _encode_zeroed(config: t5.T5Config, params, ids, mask):
    emb = t5.T5Encoder(config).apply({"params": params}, ids, mask)
    if config.key_only_mask:
        return emb, mask  # HF semantics: pad rows are real outputs, which IF's U-Net reads
    # Padded positions carry no meaning (T5X masks them as queries too); zero them so they
    # are deterministic, compress well and cannot leak into a mean over length.
    return emb * mask[..., None].astype(emb.dtype), mask


@functools.lru_cache(maxsize=None)
def _jitted_encode(config: t5.T5Config, out_sharding: NamedSharding | None):
    # One compiled function per (config, output sharding), shared by TextEncoder instances.
    kwargs = {} if out_sharding is None else {"out_shardings": (out_sharding, out_sharding)}
    return jax.jit(functools.partial(_encode_zeroed, config), **kwargs)


class TextEncoder:
    """Tokenizer + T5 encoder + params behind one jitted `encode(prompts)`.

    Args:
      config, params: a T5 1.1 encoder (see `t5.load_checkpoint`, `t5.init_params`).
      tokenizer: a `T5Tokenizer`; its max_length fixes L.
      mesh: optional device mesh. The batch is sharded over `batch_axis`, padded up to a
        multiple of that axis size and stripped after. Params already placed on this mesh
        keep their sharding; others are replicated.
      batch_axis: mesh axis name or tuple of names that splits the batch. None: the mesh's
        'data' and 'fsdp' axes (imagen_jax.parallel's names), or all its axes if it has neither.
    """

    def __init__(self, config: t5.T5Config, params, tokenizer: T5Tokenizer, *,
                 mesh: Mesh | None = None, batch_axis: str | tuple[str, ...] | None = None):
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"tokenizer {tokenizer.vocab_path} has {tokenizer.vocab_size} pieces but "
                             f"the T5 embedding table only {config.vocab_size} rows")
        self.config = config
        self.tokenizer = tokenizer
        self.mesh = mesh
        params = t5._unwrap(params)
        if mesh is None:
            self.batch_multiple = 1
            self.params = jax.device_put(params)
            self._fn = _jitted_encode(config, None)
            self._data_sharding = None
        else:
            if batch_axis is None:
                batch_axis = tuple(a for a in ("data", "fsdp") if a in mesh.shape) or tuple(mesh.axis_names)
            axes = (batch_axis,) if isinstance(batch_axis, str) else tuple(batch_axis)
            missing = [a for a in axes if a not in mesh.shape]
            if missing:
                raise ValueError(f"batch_axis {missing} not in mesh axes {tuple(mesh.shape)}")
            self.batch_multiple = int(np.prod([mesh.shape[a] for a in axes]))
            replicated = NamedSharding(mesh, P())

            def place(x):
                sharding = getattr(x, "sharding", None)
                if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
                    return x
                return jax.device_put(x, replicated)

            self.params = jax.tree_util.tree_map(place, params)
            self._data_sharding = NamedSharding(mesh, P(batch_axis))
            self._fn = _jitted_encode(config, self._data_sharding)

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    @property
    def dim(self) -> int:
        return self.config.d_model

    def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """B prompts -> (embeddings [B, L, D] in config.dtype, mask bool [B, L]).

        Embeddings at padded positions (mask False) are zero, unless config.key_only_mask (HF
        semantics), where they are the encoder's outputs there.
        """
        ids, mask = self.tokenizer.tokenize(prompts)
        return self.encode_tokens(ids, mask)

    def encode_tokens(self, ids: np.ndarray, mask: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """ids int32 [B, L], mask bool [B, L] -> (embeddings [B, L, D], mask [B, L])."""
        ids = np.asarray(ids, np.int32)
        mask = np.asarray(mask, bool)
        b = ids.shape[0]
        pad = -b % self.batch_multiple
        if pad:  # whole rows of padding so every device gets the same share
            ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), np.int32)])
            mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
        if self._data_sharding is not None:
            ids = jax.device_put(ids, self._data_sharding)
            mask = jax.device_put(mask, self._data_sharding)
        emb, out_mask = self._fn(self.params, ids, mask)
        if pad:
            emb, out_mask = emb[:b], out_mask[:b]
        return emb, out_mask

    __call__ = encode

    @classmethod
    def from_checkpoint(cls, t5_path: str, vocab_path: str, *, max_length: int = 128,
                        dtype: Any = jnp.float32, compute_dtype: Any = None,
                        mesh: Mesh | None = None, batch_axis: str | tuple[str, ...] | None = None,
                        rules=None, **config_overrides) -> "TextEncoder":
        """Load T5 weights (any format `t5.load_checkpoint` reads) and the SentencePiece vocab.

        With a mesh and `rules` (logical axis rules, see t5.DEFAULT_RULES), parameters are
        read straight into their shards; with a mesh and no rules they are replicated.
        """
        tokenizer = T5Tokenizer(vocab_path, max_length=max_length)
        shardings = None
        if mesh is not None:
            shardings = (t5.sharding_fn(mesh, rules) if rules is not None
                         else NamedSharding(mesh, P()))
        config, params = t5.load_checkpoint(t5_path, dtype=dtype, shardings=shardings,
                                            compute_dtype=compute_dtype, **config_overrides)
        return cls(config, params, tokenizer, mesh=mesh, batch_axis=batch_axis)

    @classmethod
    def random(cls, tokenizer: T5Tokenizer | str, *, size: str = "tiny", seed: int = 0,
               max_length: int = 128, dtype: Any = jnp.float32, mesh: Mesh | None = None,
               batch_axis: str | tuple[str, ...] = "data", **config_overrides) -> "TextEncoder":
        """A randomly initialised (frozen) T5 encoder, e.g. for demos without real weights.

        tokenizer: a T5Tokenizer or the path of a SentencePiece model (then `max_length`
        applies). The vocabulary is the tokenizer's, rounded up to a multiple of 128 as T5
        does. `size` picks t5.SIZES (default 'tiny': d_model 64, 2 layers); any T5Config
        field can be overridden (d_model=32, num_layers=1, ...).
        """
        if not isinstance(tokenizer, T5Tokenizer):
            tokenizer = T5Tokenizer(tokenizer, max_length=max_length)
        vocab = -(-tokenizer.vocab_size // 128) * 128
        overrides = {"vocab_size": vocab, "dtype": dtype, "param_dtype": dtype, **config_overrides}
        config = t5.T5Config.from_size(size, **overrides)
        params = t5.init_params(config, jax.random.PRNGKey(seed))
        return cls(config, params, tokenizer, mesh=mesh, batch_axis=batch_axis)


# --------------------------------------------------------------------------- embedding store

STORE_FORMAT = "imagen_jax.text_embeddings"
STORE_VERSION = 1


def captions_digest(captions: Sequence[str]) -> str:
    """sha256 of the caption list, to tell whether a partial store belongs to this input."""
    h = hashlib.sha256()
    for c in captions:
        h.update(c.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _write_atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers see the old file or the whole new one, never a part


class EmbeddingStore:
    """Read access to text embeddings precomputed by `python -m imagen_jax.encode_text`.

    Layout of `directory`:
      meta.json                  run description, written first (used to resume safely)
      shard_00000.emb.npy        uint16 [n, L, D]: the bfloat16 bit patterns of the embeddings
      shard_00000.mask.npy       bool [n, L]; written after .emb.npy, so its presence marks
                                 a finished shard
      index.json                 written last: meta (count, max_length, d_model, dims, ...)
                                 + {'shards': [...], 'captions': {caption: [shard, row]}}

    `lookup(captions)` returns (embeddings bfloat16 [B, L, D], mask bool [B, L]).
    """

    META = "meta.json"
    INDEX = "index.json"

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        index_path = os.path.join(self.directory, self.INDEX)
        if not os.path.isfile(index_path):
            unfinished = os.path.isfile(os.path.join(self.directory, self.META))
            raise FileNotFoundError(
                f"{index_path}: no embedding index"
                + ("; the encode_text run that writes it did not finish (rerun it to resume)"
                   if unfinished else "; expected a directory written by imagen_jax.encode_text"))
        with open(index_path) as f:
            index = json.load(f)
        if index.get("format") != STORE_FORMAT or index.get("version") != STORE_VERSION:
            raise ValueError(f"{index_path}: not an imagen_jax text-embedding index "
                             f"(format {index.get('format')!r} version {index.get('version')!r})")
        self.meta = {k: v for k, v in index.items() if k != "captions"}
        self.count = int(index["count"])
        self.max_length = int(index["max_length"])
        self.dim = int(index["d_model"])
        self.shards: list[str] = list(index["shards"])
        self._where: dict[str, tuple[int, int]] = {c: (s, r) for c, (s, r) in index["captions"].items()}
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, caption: str) -> bool:
        return caption in self._where

    @property
    def captions(self) -> list[str]:
        return list(self._where)

    @staticmethod
    def shard_files(directory: str, shard: int) -> tuple[str, str]:
        """(embedding file, mask file) of shard number `shard`."""
        base = os.path.join(directory, f"shard_{shard:05d}")
        return base + ".emb.npy", base + ".mask.npy"

    @classmethod
    def shard_done(cls, directory: str, shard: int) -> bool:
        emb, mask = cls.shard_files(directory, shard)
        return os.path.isfile(mask) and os.path.isfile(emb)

    @classmethod
    def write_shard(cls, directory: str, shard: int, embeddings: np.ndarray, mask: np.ndarray) -> None:
        """Write one shard atomically. embeddings [n, L, D] (any float dtype), mask bool [n, L]."""
        bits = np.ascontiguousarray(np.asarray(embeddings).astype(ml_dtypes.bfloat16)).view(np.uint16)
        emb_path, mask_path = cls.shard_files(directory, shard)
        _write_atomic(emb_path, lambda f: np.save(f, bits))
        _write_atomic(mask_path, lambda f: np.save(f, np.asarray(mask, bool)))

    @classmethod
    def write_json(cls, path: str, obj: dict) -> None:
        _write_atomic(path, lambda f: f.write(json.dumps(obj).encode("utf-8")))

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        if shard not in self._open:
            emb_path, mask_path = self.shard_files(self.directory, shard)
            # Memory-mapped: a lookup reads only the requested rows.
            self._open[shard] = (np.load(emb_path, mmap_mode="r"), np.load(mask_path, mmap_mode="r"))
        return self._open[shard]

    def lookup(self, captions: Sequence[str], dtype: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """captions (B strings) -> (embeddings [B, L, D] bfloat16 or `dtype`, mask bool [B, L]).

        Raises KeyError naming the captions the store does not hold.
        """
        if isinstance(captions, str):
            captions = [captions]
        missing = [c for c in captions if c not in self._where]
        if missing:
            raise KeyError(f"{len(missing)} caption(s) not in {self.directory}, e.g. {missing[:3]}")
        emb = np.empty((len(captions), self.max_length, self.dim), np.uint16)
        mask = np.empty((len(captions), self.max_length), bool)
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for i, c in enumerate(captions):
            s, r = self._where[c]
            by_shard.setdefault(s, []).append((i, r))
        for s, pairs in by_shard.items():
            out_rows, rows = map(list, zip(*pairs))
            shard_emb, shard_mask = self._shard(s)
            emb[out_rows] = shard_emb[rows]
            mask[out_rows] = shard_mask[rows]
        emb = emb.view(ml_dtypes.bfloat16)
        return (emb if dtype is None else emb.astype(dtype)), mask
