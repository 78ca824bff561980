"""DDPM ancestral and DDIM samplers, each one `lax.scan` over all steps.

The network is only seen as `denoise_fn(x_t, logsnr) -> prediction` (eps by default), so the same
samplers drive the Imagen U-Nets, the DeepFloyd IF U-Net, or a closed-form denoiser in tests.
"""
import functools

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import keys, predictions, schedules, thresholding as thresholding_lib

SAMPLERS = ("ddpm", "ddim")


def check_sampler_args(*, schedule, sampler, num_steps, eta, thresholding, percentile, prediction, gamma=0.0):
    schedules.check_schedule(schedule)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got sampler={sampler!r}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got num_steps={num_steps!r}")
    if not isinstance(eta, jax.core.Tracer) and eta < 0:
        raise ValueError(f"eta must be >= 0, got eta={eta!r}")
    if not isinstance(gamma, jax.core.Tracer) and not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got gamma={gamma!r}")
    thresholding_lib.check_thresholding(thresholding, percentile)
    predictions.check_prediction(prediction)


def _bcast(a, x):
    return a.reshape((-1,) + (1,) * (x.ndim - 1))


def sample_loop(denoise_fn, x_init, rng, *, schedule="cosine", sampler="ddim", num_steps=100, eta=0.0,
                thresholding="dynamic", percentile=99.5, prediction="eps", gamma=0.0):
    """Runs the reverse process from pure noise `x_init` [B, ...] at t=1 to t=0; traceable.

    Steps are uniform in t. Each step predicts x0, thresholds it, then moves to the next time with
    the DDPM posterior q(x_s | x_t, x0) or the DDIM update (eta scales its noise). The last step
    returns the thresholded x0 prediction itself. The DDPM step's variance is Imagen App. A eq. 6's
    (posterior variance)^(1 - gamma) (forward variance sigma^2_{t|s})^gamma: gamma 0 is the
    posterior, gamma 1 the larger forward variance, which offsets the variance that few steps lose.
    """
    check_sampler_args(schedule=schedule, sampler=sampler, num_steps=num_steps, eta=eta,
                       thresholding=thresholding, percentile=percentile, prediction=prediction, gamma=gamma)
    logsnr_of = schedules.logsnr_fn(schedule)
    batch = x_init.shape[0]
    ts = jnp.linspace(1.0, 0.0, num_steps + 1)

    def step(x_t, i):
        lt = jnp.full((batch,), logsnr_of(ts[i]))
        ls = jnp.full((batch,), logsnr_of(ts[i + 1]))
        out = denoise_fn(x_t, lt)
        x0, _ = predictions.to_x0_eps(out, x_t, lt, prediction)
        x0 = thresholding_lib.threshold(x0, thresholding, percentile)
        a_t, s_t = (_bcast(v, x_t) for v in schedules.alpha_sigma(lt))
        a_s, s_s = (_bcast(v, x_t) for v in schedules.alpha_sigma(ls))
        # 1 - SNR(t)/SNR(s), computed without cancellation.
        one_minus_r = _bcast(-jnp.expm1(lt - ls), x_t)
        var = one_minus_r * s_s**2  # DDPM posterior variance
        # sigma^2_{t|s} = one_minus_r * s_t^2 shares the factor one_minus_r with the posterior.
        ddpm_var = one_minus_r * (s_s**2) ** (1.0 - gamma) * (s_t**2) ** gamma
        z = keys.normal(keys.fold_in(rng, i), x_t.shape)  # rng: one key, or one per example
        if sampler == "ddpm":
            mean = (1.0 - one_minus_r) * (a_s / a_t) * x_t + one_minus_r * a_s * x0
            x_s = mean + jnp.sqrt(ddpm_var) * z
        else:
            eps = (x_t - a_t * x0) / s_t  # re-derived from the thresholded x0
            c2 = (eta**2) * var
            x_s = a_s * x0 + jnp.sqrt(jnp.maximum(s_s**2 - c2, 0.0)) * eps + jnp.sqrt(c2) * z
        x_s = jnp.where(i == num_steps - 1, x0, x_s)
        return x_s.astype(jnp.float32), None

    x, _ = jax.lax.scan(step, x_init.astype(jnp.float32), jnp.arange(num_steps))
    return x


@functools.partial(
    jax.jit,
    static_argnames=("denoise_fn", "shape", "schedule", "sampler", "num_steps", "thresholding", "prediction"),
)
def _sample_jit(rng, eta, percentile, gamma, *, denoise_fn, shape, schedule, sampler, num_steps, thresholding,
                prediction):
    init_rng, loop_rng = jax.random.split(rng)
    x_init = jax.random.normal(init_rng, shape, jnp.float32)
    return sample_loop(denoise_fn, x_init, loop_rng, schedule=schedule, sampler=sampler, num_steps=num_steps,
                       eta=eta, thresholding=thresholding, percentile=percentile, prediction=prediction,
                       gamma=gamma)


def sample(denoise_fn, shape, rng, *, schedule="cosine", sampler="ddim", num_steps=100, eta=0.0,
           thresholding="dynamic", percentile=99.5, prediction="eps", gamma=0.0):
    """Draws samples of `shape` ([B, ...]) from the model `denoise_fn(x_t, logsnr[B]) -> eps`.

    One jitted program for all steps; repeated calls with the same `denoise_fn` object, shape and
    static options reuse the compiled program (eta, percentile and gamma are traced values).
    """
    check_sampler_args(schedule=schedule, sampler=sampler, num_steps=num_steps, eta=eta,
                       thresholding=thresholding, percentile=percentile, prediction=prediction, gamma=gamma)
    return _sample_jit(rng, jnp.float32(eta), jnp.float32(percentile), jnp.float32(gamma), denoise_fn=denoise_fn,
                       shape=tuple(int(d) for d in shape), schedule=schedule, sampler=sampler,
                       num_steps=num_steps, thresholding=thresholding, prediction=prediction)
