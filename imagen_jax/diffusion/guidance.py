"""Classifier-free guidance in one batched forward pass."""
import jax
import jax.numpy as jnp


def guided(model_fn, guidance_scale, cond_fn=None):
    """Wraps `model_fn(x[2B], logsnr[2B]) -> out[2B]`, whose first half of the batch is conditioned
    on the text and whose second half is unconditional, into `denoise_fn(x[B], logsnr[B])` returning
    uncond + w * (cond - uncond). `guidance_scale` may be a traced scalar, so changing it does not
    recompile. Combining raw outputs is exact for eps, v and x0 prediction alike: each is affine in
    the other at fixed (x_t, logsnr).

    With `cond_fn(x[B], logsnr[B])` (the conditional half alone), a guidance weight of exactly 1,
    where the combination is the conditional output, runs only that half: a `lax.cond` on the traced
    weight, so the unconditional pass costs nothing and the program is still compiled once.
    """

    def both(x, logsnr):
        out = model_fn(jnp.concatenate([x, x], 0), jnp.concatenate([logsnr, logsnr], 0))
        out = out.astype(jnp.float32)
        cond, uncond = jnp.split(out, 2, axis=0)
        return uncond + guidance_scale * (cond - uncond)

    if cond_fn is None:
        return both

    def denoise_fn(x, logsnr):
        return jax.lax.cond(jnp.asarray(guidance_scale) == 1.0,
                            lambda: cond_fn(x, logsnr).astype(jnp.float32), lambda: both(x, logsnr))

    return denoise_fn
