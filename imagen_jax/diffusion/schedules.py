"""Continuous-time variance-preserving noise schedules, parameterised by log-SNR.

A schedule maps time t in [0, 1] (0 = data, 1 = noise) to logsnr(t) = log(alpha^2 / sigma^2),
with alpha^2 = sigmoid(logsnr) and sigma^2 = sigmoid(-logsnr).
"""
import jax
import jax.numpy as jnp

SCHEDULES = ("cosine", "linear")

# The cosine schedule is clipped so that logsnr stays finite at both ends (as in VDM / Imagen).
LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0
# The paper's "linear" schedule for SR1024: discrete betas 1e-4 .. 0.02 over 1000 steps, taken to
# continuous time (beta(t) = 1000 * beta_i).
LINEAR_BETA_0 = 0.1
LINEAR_BETA_1 = 20.0
# Noise conditioning augmentation (the noise put on a super-resolution stage's low-res input) uses
# this one schedule on every stage, whatever the stage's own: an aug_level then means the same noise
# variance on SR256 (cosine) and SR1024 (linear), so the paper's single recommended range (D.2:
# "0.1 to 0.3", aug_level = 0.3 for both SR models) means one thing. Cosine is the base's and SR256's
# own schedule, so only SR1024's mapping changed (0.3: noise variance 0.21, was 0.60 through linear).
AUG_SCHEDULE = "cosine"


def check_schedule(schedule):
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got schedule={schedule!r}")
    return schedule


def logsnr_fn(schedule):
    """Returns t -> logsnr(t) for a named schedule; t any shape, float32."""
    check_schedule(schedule)
    if schedule == "cosine":
        t_min = jnp.arctan(jnp.exp(-0.5 * LOGSNR_MAX))
        t_max = jnp.arctan(jnp.exp(-0.5 * LOGSNR_MIN))

        def cosine(t):
            t = jnp.asarray(t, jnp.float32)
            return -2.0 * jnp.log(jnp.tan(t_min + t * (t_max - t_min)))

        return cosine

    def linear(t):
        t = jnp.asarray(t, jnp.float32)
        # alpha_bar(t) = exp(-int_0^t beta); logsnr = -log(1/alpha_bar - 1) = -log(expm1(int beta)).
        integral = LINEAR_BETA_0 * t + 0.5 * (LINEAR_BETA_1 - LINEAR_BETA_0) * t**2
        return -jnp.log(jnp.expm1(jnp.maximum(integral, 1e-9)))

    return linear


def aug_logsnr(aug_level):
    """Log-SNR of a conditioning-augmentation level in [0, 1] (any shape), through AUG_SCHEDULE."""
    return logsnr_fn(AUG_SCHEDULE)(aug_level)


def alpha_sigma(logsnr):
    """(alpha, sigma) for a log-SNR array: alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr)."""
    logsnr = jnp.asarray(logsnr, jnp.float32)
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def q_sample(x0, logsnr, noise):
    """Forward process: x_t = alpha x0 + sigma eps. x0, noise [B, ...]; logsnr [B]."""
    alpha, sigma = alpha_sigma(logsnr)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return alpha.reshape(shape) * x0 + sigma.reshape(shape) * noise


def logsnr_to_time(logsnr):
    """The cosine-schedule time in [0, 1] that has this log-SNR: a schedule-free way to feed
    noise levels to a network (bounded, monotone)."""
    return jnp.arctan(jnp.exp(-0.5 * jnp.asarray(logsnr, jnp.float32))) * (2.0 / jnp.pi)
