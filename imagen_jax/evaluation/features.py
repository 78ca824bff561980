"""A sharded, resumable store of Inception features for long FID runs.

Sampling 30k images takes hours, so features are written shard by shard:

    workdir/
      store.json              {"dim": 2048, "num_shards": 60, "shard_size": 500, "total": 30000}
      shard-00000.npy         float32 [n_0, dim]
      shard-00001.npy         ...

A shard file appears only once complete: locally it is written to a temporary
name in the same directory and renamed (`os.replace` is atomic on POSIX), so a
run killed mid-write leaves at most a stray temp file, never a truncated shard;
on gs:// (through `imagen_jax.paths`) an object upload is atomic by itself. A
resumed run asks `missing()` and computes only those shards; `concatenate()`
joins them in index order once all are there.

Shard i covers items [i * shard_size, min((i + 1) * shard_size, total)).
"""

from __future__ import annotations

import io
import json
import os
import re
from typing import Callable

import numpy as np

from imagen_jax import paths

_SHARD_RE = re.compile(r"^shard-(\d{5,})\.npy$")


class FeatureStore:
    """Feature shards [n, dim] under `workdir`; see the module docstring.

    total: number of items (e.g. 30000 prompts); shard_size: items per shard.
    Re-opening a workdir with a different (total, shard_size, dim) raises
    ValueError, so a resumed run cannot silently mix two layouts.
    """

    def __init__(self, workdir: str | os.PathLike, total: int, shard_size: int, dim: int = 2048):
        if total < 1 or shard_size < 1 or dim < 1:
            raise ValueError(
                f"total, shard_size and dim must be >= 1, got {total}, {shard_size}, {dim}")
        self.workdir = os.fspath(workdir)
        self.total, self.shard_size, self.dim = int(total), int(shard_size), int(dim)
        self.num_shards = -(-self.total // self.shard_size)
        paths.makedirs(self.workdir)
        layout = {"dim": self.dim, "num_shards": self.num_shards,
                  "shard_size": self.shard_size, "total": self.total}
        meta = paths.join(self.workdir, "store.json")
        if paths.exists(meta):
            found = json.loads(paths.read_text(meta))
            if found != layout:
                raise ValueError(
                    f"feature store {self.workdir!r} was created with {found}, "
                    f"but this run asks for {layout}; use a fresh workdir")
        else:
            self._atomic_write(meta, lambda f: f.write(json.dumps(layout, sort_keys=True).encode()))

    # -- layout -----------------------------------------------------------------

    def shard_path(self, index: int) -> str:
        return paths.join(self.workdir, f"shard-{index:05d}.npy")

    def shard_range(self, index: int) -> tuple[int, int]:
        """[start, stop) of the items in shard `index`."""
        self._check_index(index)
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.total)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard index {index} out of range [0, {self.num_shards})")

    # -- state ------------------------------------------------------------------

    def finished(self) -> list[int]:
        """Indices of shards already on disk, ascending."""
        done = []
        for name in paths.listdir(self.workdir):
            m = _SHARD_RE.match(name)
            if m and int(m.group(1)) < self.num_shards:
                done.append(int(m.group(1)))
        return sorted(done)

    def missing(self) -> list[int]:
        """Indices of shards still to compute, ascending."""
        done = set(self.finished())
        return [i for i in range(self.num_shards) if i not in done]

    def is_complete(self) -> bool:
        return not self.missing()

    # -- io -----------------------------------------------------------------------

    def _atomic_write(self, path: str, write: Callable) -> None:
        buf = io.BytesIO()
        write(buf)
        paths.write_bytes(path, buf.getvalue())  # atomic, local or gs://

    def write(self, index: int, features) -> str:
        """Store float32 [n, dim] features for shard `index` (n = its item count)."""
        start, stop = self.shard_range(index)
        x = np.asarray(features, np.float32)
        if x.shape != (stop - start, self.dim):
            raise ValueError(
                f"shard {index} must hold features [{stop - start}, {self.dim}] "
                f"(items {start}..{stop - 1}), got shape {x.shape}")
        path = self.shard_path(index)
        self._atomic_write(path, lambda f: np.save(f, x, allow_pickle=False))
        return path

    def read(self, index: int) -> np.ndarray:
        """float32 [n, dim] features of a finished shard."""
        start, stop = self.shard_range(index)
        path = self.shard_path(index)
        if not paths.exists(path):
            raise FileNotFoundError(f"shard {index} is not finished: {path!r} does not exist")
        x = np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False)
        if x.shape != (stop - start, self.dim):
            raise ValueError(f"{path!r} holds shape {x.shape}, expected {(stop - start, self.dim)}")
        return x

    def concatenate(self) -> np.ndarray:
        """All features, float32 [total, dim], in item order. Raises if shards are missing."""
        missing = self.missing()
        if missing:
            raise ValueError(
                f"feature store {self.workdir!r} is incomplete: {len(missing)} of "
                f"{self.num_shards} shards missing, e.g. {missing[:5]}")
        return np.concatenate([self.read(i) for i in range(self.num_shards)], axis=0)

    def fill(self, compute: Callable[[int, int, int], np.ndarray]) -> np.ndarray:
        """Compute every missing shard with compute(index, start, stop) -> [stop - start, dim],
        writing each as soon as it is done, then return `concatenate()`."""
        for index in self.missing():
            start, stop = self.shard_range(index)
            self.write(index, compute(index, start, stop))
        return self.concatenate()


__all__ = ["FeatureStore"]
