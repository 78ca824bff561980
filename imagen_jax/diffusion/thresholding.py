"""Thresholding of the predicted x0 at every sampling step (Imagen Sec. 2.3)."""
import jax
import jax.numpy as jnp

THRESHOLDINGS = ("none", "static", "dynamic")


def check_thresholding(thresholding, percentile=99.5):
    if thresholding not in THRESHOLDINGS:
        raise ValueError(f"thresholding must be one of {THRESHOLDINGS}, got thresholding={thresholding!r}")
    if isinstance(percentile, jax.core.Tracer):
        return  # checked where the value was still concrete
    if not (0.0 < float(percentile) <= 100.0):
        raise ValueError(f"percentile must be in (0, 100], got percentile={percentile!r}")


def dynamic_threshold(x0, percentile=99.5):
    """Per-sample dynamic thresholding.

    s = the `percentile`-th percentile (0-100 scale, linear interpolation as NumPy) of |x0| over all
    non-batch axes of each sample, s = max(s, 1); x0 is clipped to [-s, s] and divided by s.
    x0: [B, ...]; returns the same shape and dtype.
    """
    check_thresholding("dynamic", percentile)
    x = jnp.asarray(x0)
    flat = jnp.abs(x.reshape(x.shape[0], -1)).astype(jnp.float32)
    s = jnp.percentile(flat, percentile, axis=1)
    s = jnp.maximum(s, 1.0).reshape((-1,) + (1,) * (x.ndim - 1))
    return (jnp.clip(x.astype(jnp.float32), -s, s) / s).astype(x.dtype)


def threshold(x0, thresholding, percentile=99.5):
    """Applies the named thresholding ("none", "static": clip to [-1, 1], "dynamic")."""
    check_thresholding(thresholding, percentile)
    if thresholding == "none":
        return x0
    if thresholding == "static":
        return jnp.clip(x0, -1.0, 1.0)
    return dynamic_threshold(x0, percentile)
