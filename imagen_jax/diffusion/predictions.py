"""What the network predicts (epsilon, v or x0) and the conversions between them."""
import jax.numpy as jnp

from imagen_jax.diffusion.schedules import alpha_sigma

PREDICTIONS = ("eps", "v", "x0")


def check_prediction(prediction):
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got prediction={prediction!r}")
    return prediction


def _bcast(a, x):
    return a.reshape((-1,) + (1,) * (x.ndim - 1))


def to_x0_eps(output, x_t, logsnr, prediction):
    """Network output -> (x0_hat, eps_hat) in float32. x_t [B, ...], logsnr [B]."""
    check_prediction(prediction)
    alpha, sigma = alpha_sigma(logsnr)
    a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
    out = output.astype(jnp.float32)
    x_t = x_t.astype(jnp.float32)
    if prediction == "eps":
        return (x_t - s * out) / a, out
    if prediction == "x0":
        return out, (x_t - a * out) / s
    x0 = a * x_t - s * out  # v = alpha eps - sigma x0
    return x0, s * x_t + a * out


def target(x0, noise, logsnr, prediction):
    """The regression target of the named prediction type."""
    check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    alpha, sigma = alpha_sigma(logsnr)
    return _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0
