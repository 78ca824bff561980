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


class _Recorder:
    """Stands in for a stage's U-Net: records the conditioning-augmentation log-SNR it is given."""

    def __init__(self, config):
        self.config, self.seen = config, []

    def apply(self, variables, x, logsnr, text, text_mask, lowres=None, lowres_logsnr=None, mutable=None, **kw):
        if mutable:  # the sampler's one text-cache pass (models.unet.text_cache), not a sampling step
            return jnp.zeros_like(x), {"text_cache": {}}
        jax.debug.callback(lambda v: self.seen.append(np.asarray(v)), lowres_logsnr)
        return jnp.zeros_like(x)


def _sr_configs():
    from tests.stage_utils import tiny_config
    small = {"data.image_size": 16, "data.full_size": 0, "diffusion.lowres_size": 8}  # only the schedules matter
    c256, c1024 = tiny_config("sr256", **small), tiny_config("sr1024", **small)
    assert (c256.diffusion.schedule, c1024.diffusion.schedule) == ("cosine", "linear")
    return c256, c1024


def test_aug_level_gives_the_same_noise_on_every_sr_stage_when_sampling():
    # Item 6: aug_level 0.3 was noise variance 0.21 on SR256 (cosine) but 0.60 on SR1024 (linear).
    from imagen_jax import cascade, parallel
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    variances = []
    for c in _sr_configs():
        stage = cascade.Stage(config=c, params={"w": jnp.zeros(())}, source="test", step=0)
        settings = cascade.StageSettings(sampler="ddim", steps=1, guidance=2.0, thresholding="none",
                                         aug_level=0.3)
        sampler = cascade.StageSampler(stage, mesh, settings)
        sampler.model = _Recorder(sampler.model.config)
        n, low = 8, stage.lowres_size
        sampler(np.zeros((n, 4, c.model.text_dim), np.float32), np.ones((n, 4), bool),
                np.zeros((n, low, low, 3), np.float32), jax.random.PRNGKey(0)).block_until_ready()
        jax.effects_barrier()
        logsnr = np.concatenate(sampler.model.seen)
        variances.append(1 / (1 + np.exp(logsnr)))  # sigma^2 = sigmoid(-logsnr)
    expected = math.sin(0.3 * math.pi / 2) ** 2  # the cosine schedule's sigma^2 at t = 0.3 (its clip is ~1e-9)
    for v in variances:
        np.testing.assert_allclose(v, expected, rtol=1e-4)


def test_aug_levels_drawn_in_training_give_the_same_noise_on_every_sr_stage():
    from imagen_jax import parallel, training
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    seen = []
    for c in _sr_configs():
        c.diffusion.noise_aug, c.diffusion.aug_max = True, 1.0
        trainer = training.Trainer(c, mesh)
        trainer.model = _Recorder(trainer.model.config)
        s, low, n = c.data.image_size, c.diffusion.lowres_size, 4
        batch = {"image": jnp.zeros((n, s, s, 3)), "lowres": jnp.zeros((n, low, low, 3)),
                 "text": jnp.zeros((n, 4, c.model.text_dim)), "text_mask": jnp.ones((n, 4), bool)}
        jax.jit(trainer.loss_fn)(None, batch, jax.random.PRNGKey(1)).block_until_ready()
        jax.effects_barrier()
        seen.append(np.concatenate(trainer.model.seen))
    np.testing.assert_array_equal(seen[0], seen[1])
    # The same draw of levels t, through the cosine augmentation schedule.
    t = np.asarray(jax.random.uniform(jax.random.split(jax.random.PRNGKey(1), 5)[1], (4,)), np.float64)
    np.testing.assert_allclose(1 / (1 + np.exp(seen[0])), np.sin(t * np.pi / 2) ** 2, rtol=1e-3, atol=1e-8)
