"""T5X legacy layout edge cases: bfloat16 stored as uint16 (checkpoint version < 3) and arrays whose
chunking no longer matches the spec in the msgpack file (T5X ignores the spec's chunks/compressor)."""
import os

import flax.serialization
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from imagen_jax.text import t5
from imagen_jax.text.checkpoints import CheckpointError
from test_t5 import flat, write_t5x_zarr  # noqa: E402  (tests/ is on sys.path)

KEY = "token_embedder/embedding"


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return t5.load_checkpoint(os.path.join(fixtures_dir, "t5x", "test_t5_tiny.checkpoint_0"))


def _edit(ckpt_dir, fn):
    path = os.path.join(ckpt_dir, "checkpoint")
    with open(path, "rb") as f:
        tree = flax.serialization.msgpack_restore(f.read())
    fn(tree)
    with open(path, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(tree))


def _rewrite_embedding(ckpt_dir, arr, dtype, chunks):
    rel = "target." + KEY.replace("/", ".")
    store = ts.open({"driver": "zarr", "dtype": dtype, "kvstore": {"driver": "file", "path": os.path.join(ckpt_dir, rel)},
                     "metadata": {"chunks": chunks, "shape": list(arr.shape), "compressor": {"id": "zlib", "level": 3}}},
                    create=True, delete_existing=True).result()
    store.write(arr).result()


def _legacy_uint16(tiny, ckpt_dir, version):
    emb = np.asarray(flat(tiny[1])[KEY], np.float32)
    bits = emb.astype(ml_dtypes.bfloat16).view(np.uint16)
    write_t5x_zarr(tiny[1], ckpt_dir, ghost_optimizer_state=False)
    _rewrite_embedding(ckpt_dir, bits, "uint16", list(bits.shape))

    def fn(tree):
        tree["version"] = version
        tree["optimizer"]["target"]["token_embedder"]["embedding"]["dtype"] = "uint16"
    _edit(ckpt_dir, fn)
    return emb.astype(ml_dtypes.bfloat16).astype(np.float32)


def test_uint16_bfloat16_of_version_2_is_reinterpreted(tiny, tmp_path):
    want = _legacy_uint16(tiny, str(tmp_path / "checkpoint_1"), version=2)
    _, params = t5.load_checkpoint(str(tmp_path / "checkpoint_1"))
    got = np.asarray(flat(params)[KEY])
    np.testing.assert_array_equal(got, want)  # bit-exact, not 16256.0 for 1.0
    for k, v in flat(params).items():
        if k != KEY:
            np.testing.assert_array_equal(np.asarray(v), np.asarray(flat(tiny[1])[k]))


def test_uint16_in_a_version_3_checkpoint_is_refused(tiny, tmp_path):
    _legacy_uint16(tiny, str(tmp_path / "checkpoint_1"), version=3)
    with pytest.raises(CheckpointError, match="uint16 .* version 3"):
        t5.load_checkpoint(str(tmp_path / "checkpoint_1"))


def test_rechunked_array_loads(tiny, tmp_path):
    ckpt = str(tmp_path / "checkpoint_1")
    write_t5x_zarr(tiny[1], ckpt, ghost_optimizer_state=False)
    emb = np.asarray(flat(tiny[1])[KEY], np.float32)
    # Re-chunked and recompressed on disk; the msgpack spec still names the old chunks and gzip.
    _rewrite_embedding(ckpt, emb, "float32", [max(1, emb.shape[0] // 3), emb.shape[1] // 2])
    _, params = t5.load_checkpoint(ckpt)
    np.testing.assert_array_equal(np.asarray(flat(params)[KEY]), emb)
