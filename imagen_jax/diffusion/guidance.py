"""Classifier-free guidance in one batched forward pass."""
import jax.numpy as jnp


def guided(model_fn, guidance_scale):
    """Wraps `model_fn(x[2B], logsnr[2B]) -> out[2B]`, whose first half of the batch is conditioned
    on the text and whose second half is unconditional, into `denoise_fn(x[B], logsnr[B])` returning
    uncond + w * (cond - uncond). `guidance_scale` may be a traced scalar, so changing it does not
    recompile. Combining raw outputs is exact for eps, v and x0 prediction alike: each is affine in
    the other at fixed (x_t, logsnr).
    """

    def denoise_fn(x, logsnr):
        out = model_fn(jnp.concatenate([x, x], 0), jnp.concatenate([logsnr, logsnr], 0))
        out = out.astype(jnp.float32)
        cond, uncond = jnp.split(out, 2, axis=0)
        return uncond + guidance_scale * (cond - uncond)

    return denoise_fn
