"""The text-embedding store: T5 embeddings of captions, written by `python -m imagen_jax.encode_text` (every
host its share, in parallel, appendable) and read by training, sampling and FID evaluation.

    store = EmbeddingStore("gs://bucket/coco_t5xxl")       # or a local directory
    emb, mask = store.lookup(["a corgi on a skateboard"])   # bfloat16 [B, L, D], bool [B, L]

Layout of a store directory (local or gs://, through imagen_jax.paths):
  store.json                 format, version, max_length, d_model, dtype, compression, and the T5 and
                             vocabulary fingerprints every part was written with
  parts/NAME.rows            one zstd frame per caption, back to back (see `encode_row`)
  parts/NAME.index.npy       INDEX_DTYPE [n] sorted by hash: (hash, offset, length) of each row in
                             NAME.rows; written after the rows, so its presence marks a finished part

A part is one writer's chunk (NAME = run id, chunk number); hosts write disjoint chunks, so no two writers
ever touch the same file and no coordination is needed beyond store.json (identical for every writer).
Appending is writing more parts. The reader keeps only a fixed-size entry per caption in memory (hash,
part, offset, length: 24 bytes), never the captions; each row carries its caption, compared on lookup, so a
64-bit hash collision is an error, never a wrong embedding.

Captions are normalised (`normalize_caption`: whitespace runs collapsed, ends stripped) on write and on
lookup, so "  a cat " finds "a cat". SentencePiece normalises whitespace the same way, so the two spellings
have the same tokens and the same embedding.
"""
from __future__ import annotations

import hashlib
import io
import json
import threading
from typing import Any, Sequence

import ml_dtypes
import msgpack
import numpy as np

from imagen_jax import paths

FORMAT = "imagen_jax.text_embeddings"
VERSION = 2
META = "store.json"
PARTS = "parts"
INDEX_DTYPE = np.dtype([("hash", "<u8"), ("offset", "<u8"), ("length", "<u4")])
ZSTD_LEVEL = 3  # level 3 is zstd's default: ~2x of level 19's size at ~30x its speed on bf16 rows
# Fields that must agree between a store and anything written into it or read as part of it.
COMPATIBLE = ("format", "version", "max_length", "d_model", "dtype", "model_sha256", "vocab_sha256")


class MissingCaptionsError(KeyError):
    """Captions the store does not hold; `.missing` lists them (normalised)."""

    def __init__(self, message, missing):
        super().__init__(message)
        self.missing = list(missing)

    def __str__(self):
        return self.args[0]


def normalize_caption(caption) -> str:
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8")
    return " ".join(str(caption).split())


def caption_hashes(captions: Sequence[str]) -> np.ndarray:
    """uint64 [B]: blake2b-64 of the (already normalised) captions' UTF-8."""
    return np.array([int.from_bytes(hashlib.blake2b(c.encode("utf-8"), digest_size=8).digest(), "little")
                     for c in captions], np.uint64)


def captions_digest(captions: Sequence[str]) -> str:
    """sha256 of a caption list: names an encode_text run, so a restarted run finds its own parts."""
    h = hashlib.sha256()
    for c in captions:
        h.update(c.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def model_fingerprint(config, params) -> str:
    """Identifies T5 weights cheaply (shape config + final norm scale rounded to bfloat16, so float32 and
    bfloat16 loads hash alike), so neither a resumed run nor a sampler's fallback encoder can mix two T5s."""
    shape = (config.vocab_size, config.d_model, config.num_heads, config.head_dim, config.d_ff, config.num_layers)
    h = hashlib.sha256(repr(shape).encode())
    scale = params["encoder"]["encoder_norm"]["scale"]
    h.update(np.asarray(scale).astype(ml_dtypes.bfloat16).astype(np.float32).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- rows


def encode_row(caption: str, emb_bits: np.ndarray, mask: np.ndarray, compressor) -> bytes:
    """One caption's row: zstd(msgpack([caption, packed mask, padded_zero, n, byte planes])).

    emb_bits uint16 [L, D] (bfloat16 bit patterns). When the padded positions are zero (T5X semantics, what
    TextEncoder writes) only the masked rows are kept; otherwise (HF semantics) all L. The high and low bytes
    are stored as two planes: the high bytes (sign, exponent) are few distinct values and compress well,
    interleaved they would not.
    """
    mask = np.asarray(mask, bool)
    zero_pad = not emb_bits[~mask].any()
    rows = emb_bits[mask] if zero_pad else emb_bits
    planes = np.ascontiguousarray(rows.astype("<u2").view(np.uint8).reshape(-1, 2).T)
    payload = msgpack.packb([caption, np.packbits(mask).tobytes(), zero_pad, int(rows.shape[0]), planes.tobytes()])
    return compressor.compress(payload)


def decode_row(blob: bytes, max_length: int, dim: int, decompressor):
    """-> (caption, emb_bits uint16 [L, D], mask bool [L])."""
    caption, packed, zero_pad, n, planes = msgpack.unpackb(decompressor.decompress(blob))
    mask = np.unpackbits(np.frombuffer(packed, np.uint8))[:max_length].astype(bool)
    rows = np.frombuffer(planes, np.uint8).reshape(2, -1).T.copy().view("<u2").reshape(n, dim)
    if zero_pad:
        emb = np.zeros((max_length, dim), np.uint16)
        emb[mask] = rows
    else:
        emb = rows
    return caption, emb, mask


def _zstd():
    import zstandard
    return zstandard


# --------------------------------------------------------------------------- writing


def part_paths(directory, name) -> tuple[str, str]:
    return paths.join(directory, PARTS, name + ".rows"), paths.join(directory, PARTS, name + ".index.npy")


def part_done(directory, name) -> bool:
    return paths.exists(part_paths(directory, name)[1])


def read_meta(directory) -> dict | None:
    p = paths.join(directory, META)
    return json.loads(paths.read_text(p)) if paths.exists(p) else None


def create(directory, meta: dict) -> dict:
    """Writes store.json (format, version, dtype, compression added), or checks that an existing one
    agrees on COMPATIBLE. Every writer calls it; all write the same bytes, so the race is harmless."""
    meta = {"format": FORMAT, "version": VERSION, "dtype": "bfloat16", "compression": f"zstd-{ZSTD_LEVEL}",
            **meta}
    old = read_meta(directory)
    if old is not None:
        differs = [k for k in COMPATIBLE if old.get(k) != meta.get(k)]
        if differs:
            raise ValueError(f"{directory} holds embeddings of another T5 or layout "
                             f"({', '.join(f'{k} {old.get(k)!r} vs {meta.get(k)!r}' for k in differs)}); "
                             "use a new directory or delete this one")
        return old
    _check_not_old_format(directory)
    paths.makedirs(paths.join(directory, PARTS))
    paths.write_text(paths.join(directory, META), json.dumps(meta, indent=1))
    return meta


def write_part(directory, name, captions: Sequence[str], embeddings: np.ndarray, mask: np.ndarray) -> int:
    """Writes one part: captions (normalised, unique) with embeddings [n, L, D] (any float dtype, rounded to
    bfloat16) and mask bool [n, L]. Atomic per file, index last. Returns the bytes written."""
    bits = np.ascontiguousarray(np.asarray(embeddings).astype(ml_dtypes.bfloat16)).view(np.uint16)
    cctx = _zstd().ZstdCompressor(level=ZSTD_LEVEL)
    blobs = [encode_row(c, bits[i], mask[i], cctx) for i, c in enumerate(captions)]
    index = np.zeros(len(blobs), INDEX_DTYPE)
    index["hash"] = caption_hashes(captions)
    index["length"] = [len(b) for b in blobs]
    index["offset"] = np.concatenate([[0], np.cumsum(index["length"], dtype=np.uint64)[:-1]]) if blobs else []
    index.sort(order="hash", kind="stable")
    rows_path, index_path = part_paths(directory, name)
    data = b"".join(blobs)
    paths.write_bytes(rows_path, data)
    buf = io.BytesIO()
    np.save(buf, index)
    paths.write_bytes(index_path, buf.getvalue())
    return len(data) + buf.tell()


def _check_not_old_format(directory):
    if paths.exists(paths.join(directory, "index.json")) or paths.exists(paths.join(directory, "meta.json")):
        raise ValueError(f"{directory} is an embedding store of format version 1 (uncompressed, one in-memory "
                         "index); this version reads format 2 only: encode the captions again with "
                         "python -m imagen_jax.encode_text --out NEW_DIRECTORY")


# --------------------------------------------------------------------------- reading


class EmbeddingStore:
    """Reads a store directory (see the module docstring). `lookup(captions)` -> (bfloat16 [B, L, D],
    bool [B, L]); captions are normalised first. Thread-safe."""

    META = META

    def __init__(self, directory):
        self.directory = str(directory)
        meta = read_meta(self.directory)
        if meta is None:
            _check_not_old_format(self.directory)
            raise FileNotFoundError(f"{paths.join(self.directory, META)}: no embedding store here; expected a "
                                    "directory written by python -m imagen_jax.encode_text")
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{self.directory}: not an imagen_jax text-embedding store of version {VERSION} "
                             f"(format {meta.get('format')!r} version {meta.get('version')!r})")
        self.meta = meta
        self.max_length, self.dim = int(meta["max_length"]), int(meta["d_model"])
        parts_dir = paths.join(self.directory, PARTS)
        names = ([n[:-len(".index.npy")] for n in paths.listdir(parts_dir) if n.endswith(".index.npy")]
                 if paths.exists(parts_dir) else [])
        self.parts = sorted(names)
        indexes = [np.load(io.BytesIO(paths.read_bytes(part_paths(self.directory, n)[1]))) for n in self.parts]
        n = sum(len(i) for i in indexes)
        # One sorted table over all parts: 24 bytes a caption (the captions themselves stay on disk).
        self._hash = np.empty(n, np.uint64)
        self._part = np.empty(n, np.uint32)
        self._offset = np.empty(n, np.uint64)
        self._length = np.empty(n, np.uint32)
        at = 0
        for k, idx in enumerate(indexes):
            s = slice(at, at + len(idx))
            self._hash[s], self._offset[s], self._length[s] = idx["hash"], idx["offset"], idx["length"]
            self._part[s] = k
            at += len(idx)
        order = np.argsort(self._hash, kind="stable")
        for name in ("_hash", "_part", "_offset", "_length"):
            setattr(self, name, getattr(self, name)[order])
        self._files: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._dctx = _zstd().ZstdDecompressor()

    def __len__(self) -> int:
        """Rows held (a caption appended twice by two runs counts twice)."""
        return len(self._hash)

    @property
    def count(self) -> int:
        return len(self)

    @property
    def index_bytes(self) -> int:
        """Memory of the in-memory index."""
        return sum(getattr(self, n).nbytes for n in ("_hash", "_part", "_offset", "_length"))

    def _candidates(self, hashes: np.ndarray):
        lo = np.searchsorted(self._hash, hashes, side="left")
        hi = np.searchsorted(self._hash, hashes, side="right")
        return lo, hi

    def contains(self, captions: Sequence[str]) -> np.ndarray:
        """bool [B]: which captions (normalised) have a row, by hash (a collision is caught by lookup)."""
        captions = [normalize_caption(c) for c in captions]
        lo, hi = self._candidates(caption_hashes(captions))
        return hi > lo

    def __contains__(self, caption: str) -> bool:
        return bool(self.contains([caption])[0])

    def _read(self, part: int, offset: int, length: int) -> bytes:
        with self._lock:
            f = self._files.get(part)
            if f is None:
                f = self._files[part] = paths.path(part_paths(self.directory, self.parts[part])[0]).open("rb")
            f.seek(int(offset))
            return f.read(int(length))

    def lookup(self, captions: Sequence[str], dtype: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """captions (B strings) -> (embeddings [B, L, D] bfloat16 or `dtype`, mask bool [B, L]).

        Raises MissingCaptionsError (a KeyError) naming the captions the store does not hold."""
        if isinstance(captions, (str, bytes)):
            captions = [captions]
        captions = [normalize_caption(c) for c in captions]
        lo, hi = self._candidates(caption_hashes(captions))
        missing = [c for c, a, b in zip(captions, lo, hi) if a == b]
        if missing:
            raise MissingCaptionsError(f"{len(missing)} caption(s) not in the embedding store {self.directory}, "
                                       f"e.g. {missing[:3]}", missing)
        emb = np.empty((len(captions), self.max_length, self.dim), np.uint16)
        mask = np.empty((len(captions), self.max_length), bool)
        # Read in (part, offset) order: sequential within a file.
        for i in sorted(range(len(captions)), key=lambda i: (self._part[lo[i]], self._offset[lo[i]])):
            for j in range(lo[i], hi[i]):  # several entries only for a duplicate or a hash collision
                text, e, m = decode_row(self._read(self._part[j], self._offset[j], self._length[j]),
                                        self.max_length, self.dim, self._dctx)
                if text == captions[i]:
                    emb[i], mask[i] = e, m
                    break
            else:
                raise MissingCaptionsError(f"caption {captions[i]!r} is not in the embedding store "
                                           f"{self.directory} (its hash matches another caption's)", [captions[i]])
        emb = emb.view(ml_dtypes.bfloat16)
        return (emb if dtype is None else emb.astype(dtype)), mask

    def close(self):
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()


__all__ = ["COMPATIBLE", "EmbeddingStore", "FORMAT", "INDEX_DTYPE", "META", "MissingCaptionsError", "VERSION",
           "captions_digest", "caption_hashes", "create", "decode_row", "encode_row", "model_fingerprint",
           "normalize_caption", "part_done", "part_paths", "read_meta", "write_part"]
