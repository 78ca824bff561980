"""Denoising training loss for continuous-time diffusion."""
import jax
import jax.numpy as jnp

from imagen_jax.diffusion import predictions, schedules

WEIGHTINGS = ("none", "min_snr", "min_snr_plus1", "p2")


def loss_weight(logsnr, prediction, weighting, *, min_snr_gamma=5.0, p2_k=1.0, p2_gamma=1.0):
    """Per-example weight [B] applied to the mean squared error of `prediction`'s target.

    min_snr: the x0-space weight min(snr, gamma) (Hang et al. 2023), expressed for the prediction
    type (eps-MSE = snr * x0-MSE, v-MSE = (snr + 1) * x0-MSE). min_snr_plus1: the x0-space weight
    min(snr + 1, gamma), i.e. min-SNR with the v-prediction's SNR + 1 (as diffusers does for v): it
    never falls below 1, so the noisiest levels, where a sample's layout (background, position) is
    decided, are not starved as min(snr, gamma) -> 0 starves them. p2: 1 / (k + snr)^gamma on top
    of the plain loss (Choi et al. 2022).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got weighting={weighting!r}")
    predictions.check_prediction(prediction)
    snr = jnp.exp(logsnr.astype(jnp.float32))
    if weighting == "none":
        return jnp.ones_like(snr)
    if weighting == "p2":
        return 1.0 / (p2_k + snr) ** p2_gamma
    clipped = jnp.minimum(snr + 1.0 if weighting == "min_snr_plus1" else snr, min_snr_gamma)
    return clipped / {"eps": snr, "v": snr + 1.0, "x0": jnp.ones_like(snr)}[prediction]


def sample_logsnr(rng, batch, schedule, max_t=1.0):
    """Draws t ~ U(0, max_t) per example and returns its log-SNR [B]."""
    t = jax.random.uniform(rng, (batch,), jnp.float32) * max_t
    return schedules.logsnr_fn(schedule)(t)


def diffusion_loss(apply_fn, x0, rng, *, schedule="cosine", prediction="eps", weighting="none",
                   min_snr_gamma=5.0, p2_k=1.0, p2_gamma=1.0):
    """Per-example loss [B] of the denoiser `apply_fn(x_t, logsnr) -> prediction` on clean data x0.

    x0: [B, ...] in [-1, 1]. The noise level and the noise are drawn from `rng`.
    """
    t_rng, n_rng = jax.random.split(rng)
    logsnr = sample_logsnr(t_rng, x0.shape[0], schedule)
    noise = jax.random.normal(n_rng, x0.shape, jnp.float32)
    x_t = schedules.q_sample(x0.astype(jnp.float32), logsnr, noise)
    out = apply_fn(x_t, logsnr).astype(jnp.float32)
    tgt = predictions.target(x0.astype(jnp.float32), noise, logsnr, prediction)
    mse = jnp.mean(jnp.square(out - tgt), axis=tuple(range(1, x0.ndim)))
    w = loss_weight(logsnr, prediction, weighting, min_snr_gamma=min_snr_gamma, p2_k=p2_k, p2_gamma=p2_gamma)
    return w * mse
