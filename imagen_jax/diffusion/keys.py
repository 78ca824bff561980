"""Random keys that are either one key for a whole batch or one key per example.

A sampler given one key per example ([B, 2] raw keys, or typed keys [B]) draws each example's
noise from its own key, so an image depends on its key alone, not on the batch it was sampled
in nor on how the batch was split over devices (FID resumes with another batch size or device
count reproduce the same images). A single key keeps the batch-wide draw.
"""
import jax
import jax.numpy as jnp


def is_batched(rng) -> bool:
    """True for one key per example: raw uint32 [B, 2] or typed keys [B]."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng.ndim == 1
    return rng.ndim == 2


def split(rng, num: int = 2):
    """Like jax.random.split, per example for batched keys; returns a sequence of `num` keys."""
    if is_batched(rng):
        parts = jax.vmap(lambda k: jax.random.split(k, num))(rng)  # [B, num, ...]
        return [parts[:, j] for j in range(num)]
    return list(jax.random.split(rng, num))


def fold_in(rng, data):
    if is_batched(rng):
        return jax.vmap(lambda k: jax.random.fold_in(k, data))(rng)
    return jax.random.fold_in(rng, data)


def normal(rng, shape, dtype=jnp.float32):
    """Standard normal [B, ...] = shape; with batched keys, row b comes from key b alone."""
    if is_batched(rng):
        if rng.shape[0] != shape[0]:
            raise ValueError(f"{rng.shape[0]} per-example keys for a batch of {shape[0]}")
        return jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), dtype))(rng)
    return jax.random.normal(rng, tuple(shape), dtype)


def per_image(seed: int, stream: int, ids):
    """Raw keys [N, 2]: image ids[n] of stream `stream` (e.g. the cascade stage) under `seed`."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), stream)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(ids, jnp.uint32))


__all__ = ["fold_in", "is_batched", "normal", "per_image", "split"]
