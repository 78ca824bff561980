"""Diffusion math, independent of any network: schedules, losses, samplers, guidance, thresholding.

The network is seen only as `denoise_fn(x_t, log_snr) -> eps` (or v / x0 with `prediction`).
"""
from imagen_jax.diffusion.guidance import guided
from imagen_jax.diffusion.losses import diffusion_loss, loss_weight, sample_logsnr
from imagen_jax.diffusion.predictions import to_x0_eps
from imagen_jax.diffusion.samplers import sample, sample_loop
from imagen_jax.diffusion.schedules import alpha_sigma, logsnr_fn, logsnr_to_time, q_sample
from imagen_jax.diffusion.thresholding import dynamic_threshold, threshold

__all__ = [
    "alpha_sigma", "diffusion_loss", "dynamic_threshold", "guided", "logsnr_fn", "logsnr_to_time",
    "loss_weight", "q_sample", "sample", "sample_logsnr", "sample_loop", "threshold", "to_x0_eps",
]
