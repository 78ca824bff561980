"""float16 T5 (what IF's fp16 variant invites): the padding mask bias must stay finite in float16,
else -inf reaches the softmax of padded rows and NaN the real tokens one layer later."""
import os

import jax.numpy as jnp
import numpy as np

from imagen_jax.text import t5


def test_float16_compute_close_to_float32(fixtures_dir):
    path = os.path.join(fixtures_dir, "t5x", "test_t5_tiny.checkpoint_0")
    rng = np.random.default_rng(0)
    lengths = np.array([20, 11, 3, 1])  # heavy padding: most attention entries are masked
    mask = np.arange(20)[None, :] < lengths[:, None]
    ids = np.where(mask, rng.integers(3, 32128, size=(4, 20)), 0).astype(np.int32)
    ids[np.arange(4), lengths - 1] = 1
    config32, params32 = t5.load_checkpoint(path)
    ref = np.asarray(t5.encode(config32, params32, ids, mask), np.float64)
    config16, params16 = t5.load_checkpoint(path, dtype=jnp.float16)
    out = t5.encode(config16, params16, ids, mask)
    assert out.dtype == jnp.float16
    got = np.asarray(out, np.float64)
    assert np.isfinite(got).all()
    # float16 keeps 11 significant bits: within bf16 noise (the 3e-2 bound of the bfloat16 test).
    err = np.linalg.norm(got[mask] - ref[mask]) / np.linalg.norm(ref[mask])
    assert err < 3e-2, err
