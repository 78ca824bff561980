"""Diffusion core: closed-form checks of the samplers, thresholding against NumPy, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion
from imagen_jax.diffusion import predictions, schedules

M, S = 1.5, 0.6


def gaussian_eps(x_t, logsnr):
    """Optimal eps predictor for data x0 ~ N(M, S^2): E[eps | x_t] = sigma (x_t - alpha M) / (alpha^2 S^2 + sigma^2)."""
    alpha, sigma = schedules.alpha_sigma(logsnr)
    a, s = alpha[:, None], sigma[:, None]
    return s * (x_t - a * M) / (a**2 * S**2 + s**2)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_samplers_recover_gaussian(schedule, sampler, eta):
    # Ancestral sampling with the posterior mean of x0 loses O(1/N) of the variance per run, so the
    # stochastic samplers get more steps than the deterministic DDIM (a probability-flow ODE solver).
    num_steps = 200 if (sampler == "ddim" and eta == 0.0) else 1000
    x = diffusion.sample(gaussian_eps, (8192, 2), jax.random.PRNGKey(0), schedule=schedule, sampler=sampler,
                         num_steps=num_steps, eta=eta, thresholding="none")
    x = np.asarray(x)
    assert abs(x.mean() - M) / M < 0.02, x.mean()
    assert abs(x.std() - S) / S < 0.02, x.std()


def numpy_dynamic_threshold(x0, p):
    flat = np.abs(x0.reshape(x0.shape[0], -1)).astype(np.float64)
    s = np.maximum(np.percentile(flat, p, axis=1), 1.0).reshape((-1,) + (1,) * (x0.ndim - 1))
    return np.clip(x0, -s, s) / s


@pytest.mark.parametrize("p", [99.5, 90.0, 50.0, 100.0])
def test_dynamic_threshold_matches_numpy(p):
    rng = np.random.default_rng(1)
    small = rng.uniform(-0.5, 0.5, (2, 8, 8, 3))           # s < 1: unchanged
    heavy = rng.standard_t(df=1.5, size=(3, 8, 8, 3)) * 3  # heavy tails
    x0 = np.concatenate([small, heavy]).astype(np.float32)
    got = np.asarray(diffusion.dynamic_threshold(jnp.asarray(x0), percentile=p))
    want = numpy_dynamic_threshold(x0, p)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[:2], x0[:2])
    assert np.abs(got).max() <= 1.0 + 1e-6


def test_static_threshold_and_none():
    x = jnp.asarray([[-3.0, 0.5, 2.0]])
    np.testing.assert_array_equal(diffusion.threshold(x, "static"), [[-1.0, 0.5, 1.0]])
    np.testing.assert_array_equal(diffusion.threshold(x, "none"), x)


def test_sampler_traced_once():
    traces = []

    def fn(x, logsnr):
        traces.append(1)
        return gaussian_eps(x, logsnr)

    for seed in range(3):
        diffusion.sample(fn, (8, 2), jax.random.PRNGKey(seed), sampler="ddpm", num_steps=10, eta=0.0)
    # also a different (traced) percentile must not retrace
    diffusion.sample(fn, (8, 2), jax.random.PRNGKey(5), sampler="ddpm", num_steps=10, percentile=95.0)
    assert len(traces) == 1


def test_sample_deterministic_and_seed_dependent():
    a = diffusion.sample(gaussian_eps, (8, 2), jax.random.PRNGKey(0), sampler="ddpm", num_steps=20)
    b = diffusion.sample(gaussian_eps, (8, 2), jax.random.PRNGKey(0), sampler="ddpm", num_steps=20)
    c = diffusion.sample(gaussian_eps, (8, 2), jax.random.PRNGKey(1), sampler="ddpm", num_steps=20)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_conversions_roundtrip(prediction):
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    eps = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    logsnr = jnp.asarray([-5.0, -1.0, 2.0, 6.0])
    x_t = schedules.q_sample(x0, logsnr, eps)
    out = predictions.target(x0, eps, logsnr, prediction)
    x0_hat, eps_hat = predictions.to_x0_eps(out, x_t, logsnr, prediction)
    np.testing.assert_allclose(x0_hat, x0, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(eps_hat, eps, rtol=1e-3, atol=1e-3)


def test_schedules_endpoints_and_monotone():
    t = jnp.linspace(0, 1, 101)
    for name in ("cosine", "linear"):
        ls = np.asarray(diffusion.logsnr_fn(name)(t))
        assert np.all(np.diff(ls) < 0), name
        assert ls[0] > 9 and ls[-1] < -9, (name, ls[0], ls[-1])
    # linear: alpha_bar(1) = exp(-(0.1 + 0.5 * 19.9)) as the discrete 1e-4..0.02 schedule over 1000 steps.
    alpha2 = jax.nn.sigmoid(diffusion.logsnr_fn("linear")(1.0))
    np.testing.assert_allclose(alpha2, np.exp(-(0.1 + 0.5 * 19.9)), rtol=1e-4)
    np.testing.assert_allclose(diffusion.logsnr_to_time(diffusion.logsnr_fn("cosine")(0.3)), 0.3, atol=1e-3)


def test_loss_weighting_and_value():
    x0 = jnp.zeros((16, 4, 4, 3))
    perfect = lambda x_t, logsnr: gaussian_zero_eps(x_t, logsnr)  # noqa: E731
    loss = diffusion.diffusion_loss(perfect, x0, jax.random.PRNGKey(0))
    np.testing.assert_allclose(loss, 0.0, atol=1e-5)
    w = diffusion.loss_weight(jnp.log(jnp.asarray([1.0, 10.0])), "eps", "min_snr", min_snr_gamma=5.0)
    np.testing.assert_allclose(w, [1.0, 0.5], rtol=1e-6)


def test_min_snr_plus1_weight_in_x0_space():
    # min_snr_plus1: x0-space weight min(snr + 1, gamma), expressed per prediction type
    # (eps-MSE = snr * x0-MSE, v-MSE = (snr + 1) * x0-MSE); min_snr's x0 weight min(snr, gamma) -> 0.
    snr = np.asarray([1e-4, 0.5, 3.0, 10.0, 100.0])
    logsnr = jnp.log(jnp.asarray(snr, jnp.float32))
    want_x0 = np.minimum(snr + 1.0, 5.0)
    for prediction, to_x0 in (("v", snr + 1.0), ("eps", snr), ("x0", np.ones_like(snr))):
        w = diffusion.loss_weight(logsnr, prediction, "min_snr_plus1", min_snr_gamma=5.0)
        np.testing.assert_allclose(np.asarray(w) * to_x0, want_x0, rtol=1e-5)
    v_plain = diffusion.loss_weight(logsnr, "v", "min_snr", min_snr_gamma=5.0)
    assert float(v_plain[0]) < 1e-3 and float(diffusion.loss_weight(logsnr, "v", "min_snr_plus1")[0]) == 1.0


def test_demo_base_trains_every_noise_level():
    # Issue 15's speckle: configs/demo.py's base must keep the low-noise levels trained (v-space weight
    # 1; min_snr_plus1's 5 / (snr + 1) left the last sampling steps unable to remove the remaining
    # noise) and the noisiest ones too (x0-space weight snr + 1 >= 1; min_snr's min(snr, 5) -> 0 lost
    # the background).
    from configs import demo

    c = demo.get_config("base").diffusion
    snr = np.asarray([1e-4, 0.5, 3.0, 10.0, 100.0, 3000.0])
    w = np.asarray(diffusion.loss_weight(jnp.log(jnp.asarray(snr, jnp.float32)), c.prediction, c.weighting,
                                         min_snr_gamma=c.min_snr_gamma))
    to_x0 = {"v": snr + 1.0, "eps": snr, "x0": np.ones_like(snr)}[c.prediction]
    np.testing.assert_allclose(w * to_x0 / to_x0[-1], (snr + 1.0) / (snr[-1] + 1.0), rtol=1e-4)  # x0 weight ~ snr + 1
    assert np.all(w * to_x0 >= 1.0 - 1e-4), w * to_x0


def gaussian_zero_eps(x_t, logsnr):
    # Data is exactly 0, so x_t = sigma * eps and eps = x_t / sigma.
    _, sigma = schedules.alpha_sigma(logsnr)
    return x_t / sigma[:, None, None, None]


@pytest.mark.parametrize("kwargs,name", [
    (dict(schedule="quadratic"), "schedule"),
    (dict(sampler="euler"), "sampler"),
    (dict(percentile=0.0), "percentile"),
    (dict(percentile=100.5), "percentile"),
    (dict(thresholding="soft"), "thresholding"),
    (dict(num_steps=0), "num_steps"),
])
def test_bad_sampler_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        diffusion.sample(gaussian_eps, (2, 2), jax.random.PRNGKey(0), **kwargs)


def test_bad_percentile_in_dynamic_threshold():
    with pytest.raises(ValueError, match="percentile"):
        diffusion.dynamic_threshold(jnp.ones((1, 2)), percentile=-1)


def _analytic_ddpm_std(num_steps, gamma):
    """float64 std of the DDPM sampler's output for x0 ~ N(M, S^2) with the exact eps predictor: each
    step is x_s = A x_t + b + sqrt(var) z, so Var_s = A^2 Var_t + var (cosine schedule)."""
    t_min, t_max = np.arctan(np.exp(-10.0)), np.arctan(np.exp(10.0))
    logsnr = lambda t: -2.0 * np.log(np.tan(t_min + t * (t_max - t_min)))  # noqa: E731
    ts = np.linspace(1.0, 0.0, num_steps + 1)
    var_x = 1.0  # x_init ~ N(0, 1)
    for i in range(num_steps):
        lt, ls = logsnr(ts[i]), logsnr(ts[i + 1])
        a_t, s_t = np.sqrt(1 / (1 + np.exp(-lt))), np.sqrt(1 / (1 + np.exp(lt)))
        a_s, s_s = np.sqrt(1 / (1 + np.exp(-ls))), np.sqrt(1 / (1 + np.exp(ls)))
        k = s_t / (a_t**2 * S**2 + s_t**2)          # eps = k (x_t - a_t M)
        c = (1 - s_t * k) / a_t                      # d x0 / d x_t
        if i == num_steps - 1:
            return np.sqrt(c**2 * var_x)
        omr = -np.expm1(lt - ls)
        A = (1 - omr) * a_s / a_t + omr * a_s * c
        var_x = A**2 * var_x + omr * s_s ** (2 * (1 - gamma)) * s_t ** (2 * gamma)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_ddpm_gamma_matches_analytic_variance(gamma):
    # App. A eq. 6: with 32 steps gamma visibly changes the output spread; the sampler must match
    # the float64 recursion (sampling error of the std over 65536 draws: ~0.3%; tolerance 1.5%).
    want = _analytic_ddpm_std(32, gamma)
    assert abs(_analytic_ddpm_std(32, 1.0) - _analytic_ddpm_std(32, 0.0)) / S > 0.05  # the test discriminates
    x = diffusion.sample(gaussian_eps, (65536, 1), jax.random.PRNGKey(1), schedule="cosine", sampler="ddpm",
                         num_steps=32, thresholding="none", gamma=gamma)
    assert abs(np.asarray(x).std() - want) / want < 0.015, (np.asarray(x).std(), want)


def test_bad_gamma():
    with pytest.raises(ValueError, match="gamma"):
        diffusion.sample(gaussian_eps, (2, 1), jax.random.PRNGKey(0), sampler="ddpm", gamma=1.5)


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_guidance_one_skips_the_unconditional_pass(w):
    # The network's batch sizes are recorded when it actually runs (debug callbacks inside the
    # lax.cond branch taken): weight 1 must run only the B-example conditional half.
    seen = []
    record = lambda x: seen.append(x.shape[0])  # noqa: E731

    def model_fn(x, logsnr):  # [cond; uncond]: the conditional half predicts 1, the other 0
        jax.debug.callback(record, x)
        return jnp.concatenate([jnp.ones_like(x[: x.shape[0] // 2]), jnp.zeros_like(x[x.shape[0] // 2:])], 0)

    def cond_fn(x, logsnr):
        jax.debug.callback(record, x)
        return jnp.ones_like(x)

    fn = jax.jit(lambda x, ls, g: diffusion.guided(model_fn, g, cond_fn)(x, ls))
    out = fn(jnp.zeros((4, 3)), jnp.zeros((4,)), jnp.float32(w))
    jax.effects_barrier()
    assert seen == ([4] if w == 1.0 else [8])
    np.testing.assert_allclose(out, w * np.ones((4, 3)))  # uncond + w (cond - uncond), uncond = 0
