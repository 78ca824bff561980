"""Random access to TFRecord files and a seeded per-epoch permutation computed per index, so the input
position of any training step is a function of the step alone (resume in O(1), nothing skipped is read).

    source = RecordSource(files)          # offsets of every record, from the .offsets.npy sidecars
    raw = source.read(i)                  # the i-th record's bytes (one seek + one read)
    perm = index_shuffle(np.arange(n), n, seed)   # a bijection of [0, n), any n, no table in memory

No TensorFlow here: TFRecord framing is read directly (length u64, crc u32, data, crc u32) through
imagen_jax.paths, so local and gs:// files are read the same way.
"""
from __future__ import annotations

import io
import struct
import threading

import numpy as np

from imagen_jax import paths

SIDECAR = ".offsets.npy"  # beside each TFRecord file: int64 [n + 1] byte offsets of its records (+ file size)
_MASK64 = (1 << 64) - 1


def scan_offsets(path) -> np.ndarray:
    """Offsets of the records of one TFRecord file, found by reading only the 12-byte record headers."""
    offsets, at = [], 0
    with paths.path(path).open("rb") as f:
        while True:
            f.seek(at)
            head = f.read(12)
            if not head:
                break
            if len(head) < 12:
                raise ValueError(f"{path}: truncated TFRecord header at byte {at}")
            (length,) = struct.unpack("<Q", head[:8])
            offsets.append(at)
            at += 12 + length + 4
    offsets.append(at)
    return np.asarray(offsets, np.int64)


def write_offsets(path, offsets: np.ndarray | None = None) -> str:
    """Writes PATH.offsets.npy (scanning the file unless `offsets` is given); returns its path."""
    offsets = scan_offsets(path) if offsets is None else np.asarray(offsets, np.int64)
    buf = io.BytesIO()
    np.save(buf, offsets)
    side = str(path) + SIDECAR
    paths.write_bytes(side, buf.getvalue())
    return side


def read_offsets(path) -> np.ndarray:
    side = str(path) + SIDECAR
    if paths.exists(side):
        return np.load(io.BytesIO(paths.read_bytes(side)))
    # No sidecar (files written by another tool): the headers are scanned once at start-up.
    return scan_offsets(path)


class RecordSource:
    """The records of `files` (sorted order) as one indexable sequence. `reads` counts records read."""

    def __init__(self, files):
        self.files = [str(f) for f in files]
        self._offsets = [read_offsets(f) for f in self.files]
        counts = np.array([len(o) - 1 for o in self._offsets], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._handles: dict[int, object] = {}
        self._locks = [threading.Lock() for _ in self.files]
        self.reads = 0

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Global record index -> (file number, record number in that file)."""
        f = int(np.searchsorted(self._starts, index, side="right")) - 1
        return f, int(index - self._starts[f])

    def read(self, index: int) -> bytes:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        f, r = self.locate(index)
        start, end = int(self._offsets[f][r]), int(self._offsets[f][r + 1])
        with self._locks[f]:
            h = self._handles.get(f)
            if h is None:
                h = self._handles[f] = paths.path(self.files[f]).open("rb")
            h.seek(start + 12)
            data = h.read(end - start - 16)
        self.reads += 1
        return data

    def close(self):
        for h in self._handles.values():
            h.close()
        self._handles.clear()


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64 finaliser of x ^ key: the Feistel round function (uint64, wrapping)."""
    with np.errstate(over="ignore"):
        z = (x ^ np.uint64(key & _MASK64)) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _round_keys(seed: int, rounds: int) -> list[int]:
    ss = np.random.SeedSequence(seed if isinstance(seed, (list, tuple)) else [int(seed)])
    return [int(k) for k in ss.generate_state(rounds, np.uint64)]


def index_shuffle(index, n: int, seed, rounds: int = 6) -> np.ndarray:
    """A seeded bijection of [0, n) evaluated at `index` (int array): a balanced Feistel network over the
    smallest even-bit power-of-two domain >= n, cycle-walked back into [0, n). O(1) memory and time per index,
    whatever n: the permutation of a billion records is never materialised."""
    index = np.asarray(index, np.uint64)
    if n <= 1:
        return np.zeros_like(index)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    low = np.uint64((1 << half) - 1)
    keys = _round_keys(seed, rounds)

    def permute(x):
        left, right = x >> np.uint64(half), x & low
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & low)
        return (left << np.uint64(half)) | right

    out = permute(index)
    todo = out >= np.uint64(n)
    while todo.any():  # the domain is < 4n, so a few walks at most on average
        out[todo] = permute(out[todo])
        todo = out >= np.uint64(n)
    return out


__all__ = ["RecordSource", "SIDECAR", "index_shuffle", "read_offsets", "scan_offsets", "write_offsets"]
