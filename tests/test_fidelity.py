"""The paper's training hyperparameters (Imagen App. F), checked against closed forms."""
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.training.step import make_optimizer


def paper(name):
    return importlib.import_module(f"configs.{name}").get_config("paper")


def test_base_adafactor_scales_updates_by_parameter_rms():
    # optax's default Adafactor (F.1): for an unfactored (1-D, < 128 entries) parameter the first
    # normalised update is sign(g) with RMS 1, then scaled by lr * max(1e-3, RMS(param)). Without
    # multiply_by_parameter_scale both updates would have RMS lr.
    c = paper("base64")
    c.optimizer.warmup_steps = 0  # lr(0) = 1e-4 exactly
    c.optimizer.clip_norm = 0.0
    tx, lr_fn = make_optimizer(c.optimizer, c.train.num_steps)
    lr = float(lr_fn(0))
    assert lr == pytest.approx(1e-4)
    rng = np.random.default_rng(0)
    w = rng.normal(size=64).astype(np.float32)
    w *= 0.5 / np.sqrt(np.mean(w**2))  # RMS 0.5
    params = {"w": jnp.asarray(w), "z": jnp.zeros(64)}
    grads = {k: jnp.asarray(rng.normal(size=64), jnp.float32) for k in params}
    updates, _ = tx.update(grads, tx.init(params), params)
    rms = {k: float(np.sqrt(np.mean(np.asarray(v, np.float64) ** 2))) for k, v in updates.items()}
    assert rms["w"] == pytest.approx(lr * 0.5, rel=1e-4)
    assert rms["z"] == pytest.approx(lr * 1e-3, rel=1e-4)
    np.testing.assert_array_equal(np.sign(updates["w"]), -np.sign(grads["w"]))


def _cosine(step, peak=1e-4, warmup=10_000, total=2_500_000):
    # optax.warmup_cosine_decay_schedule(0, peak, warmup, decay_steps=total), end value 0.
    if step < warmup:
        return peak * step / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("name", ["base64", "sr256"])
def test_paper_schedule_warmup_then_cosine_to_zero(name):
    c = paper(name)
    _, lr_fn = make_optimizer(c.optimizer, c.train.num_steps)
    for step, value in [(0, 0.0), (5_000, 5e-5), (10_000, 1e-4), (1_250_000, 5.0316e-5), (2_500_000, 0.0)]:
        assert float(lr_fn(step)) == pytest.approx(_cosine(step), rel=1e-4, abs=1e-10), step
        assert _cosine(step) == pytest.approx(value, rel=1e-4, abs=1e-10)


def test_sr1024_schedule_warmup_then_constant():
    # F.3 gives only "1e-4, 10000 linear warmup".
    c = paper("sr1024")
    _, lr_fn = make_optimizer(c.optimizer, c.train.num_steps)
    for step, value in [(0, 0.0), (10_000, 1e-4), (1_250_000, 1e-4), (2_500_000, 1e-4)]:
        assert float(lr_fn(step)) == pytest.approx(value, rel=1e-5, abs=1e-12), step
