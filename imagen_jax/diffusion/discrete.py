"""Discrete-time (integer timestep) diffusion, as DeepFloyd IF was trained: a 1000-step DDPM chain
read from a diffusers `scheduler_config.json`, its ancestral sampler (with learned-range variance and
IF's dynamic thresholding) and DDIM on the same chain, each one `lax.scan` over all steps.

The network is only seen as `denoise_fn(x_t [B, H, W, C], t int32 [B]) -> out [B, H, W, C or 2C]`
(eps, then the learned variance interpolation when 2C channels). `guided_split` builds it from a
conditional/unconditional model the way IF guides: on the first C channels only.

Every formula follows diffusers' DDPMScheduler / DDIMScheduler in float32, so runs with the same
injected noise replay a diffusers run to float32 rounding.
"""
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import keys

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "linspace", "trailing")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
PREDICTIONS = ("epsilon", "sample", "v_prediction")
SAMPLERS = ("ddpm", "ddim")


@dataclasses.dataclass(frozen=True)
class DiscreteSchedule:
    """A diffusers DDPM/DDIM scheduler config. Frozen and hashable: a static jit argument.

    Defaults are diffusers' `__init__` defaults, so a config file that leaves a key out means what
    it means to diffusers (IF's files leave out `timestep_spacing` -> "leading", `steps_offset` -> 0).
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    variance_type: str = "fixed_small"
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True  # DDIM only: the alpha-bar after the last step

    def __post_init__(self):
        for name, value, allowed in (("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
                                     ("timestep_spacing", self.timestep_spacing, SPACINGS),
                                     ("variance_type", self.variance_type, VARIANCE_TYPES),
                                     ("prediction_type", self.prediction_type, PREDICTIONS)):
            if value not in allowed:
                raise ValueError(f"scheduler {name}={value!r} is not supported; expected one of {allowed}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")

    @classmethod
    def from_config(cls, config: dict) -> "DiscreteSchedule":
        """From a diffusers scheduler config dict; keys this sampler does not use are ignored, but
        a config that needs a feature it lacks (trained betas, zero-SNR rescaling) is refused."""
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler config has trained_betas, which this sampler does not support")
        if config.get("rescale_betas_zero_snr"):
            raise ValueError("scheduler config has rescale_betas_zero_snr=true, which this sampler does not support")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        kw = {}
        for k, v in config.items():
            if k in fields and v is not None:
                kw[k] = fields[k](v)
        return cls(**kw)

    @classmethod
    def from_json(cls, path) -> "DiscreteSchedule":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file; expected a diffusers scheduler_config.json")
        with open(path) as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not JSON ({e})") from None
        try:
            return cls.from_config(config)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def betas(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return _torch_linspace(self.beta_start, self.beta_end, n)
        if self.beta_schedule == "scaled_linear":
            return _torch_linspace(self.beta_start**0.5, self.beta_end**0.5, n) ** 2
        abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        # Python floats, then float32, as diffusers' betas_for_alpha_bar (max_beta 0.999).
        return np.asarray([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], np.float32)

    def alphas_cumprod(self) -> np.ndarray:
        """float32 [num_train_timesteps]; the product is accumulated in float64 as torch's CPU cumprod
        does for float32 (a float32 running product drifts by up to ~5e-7)."""
        alphas = (np.float32(1.0) - self.betas()).astype(np.float32)
        return np.cumprod(alphas.astype(np.float64)).astype(np.float32)

    def timesteps(self, num_steps: int) -> np.ndarray:
        """The sampled timesteps, descending (diffusers' set_timesteps)."""
        n = self.num_train_timesteps
        if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= n:
            raise ValueError(f"steps must be an integer in [1, {n}], got {num_steps!r}")
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            ts = (np.arange(num_steps) * (n // num_steps)).round()[::-1].astype(np.int64) + self.steps_offset
        else:
            ts = np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1
        return ts

    def prev_timesteps(self, num_steps: int, sampler: str) -> np.ndarray:
        """The timestep each step moves to (-1: the end of the chain). DDPM steps to the next sampled
        timestep; DDIM, as diffusers does, always to t - num_train_timesteps // num_steps."""
        ts = self.timesteps(num_steps)
        if sampler == "ddim":
            return ts - self.num_train_timesteps // num_steps
        return np.concatenate([ts[1:], [-1]])

    def noised_steps(self, num_steps: int, sampler: str = "ddpm", eta: float = 0.0) -> np.ndarray:
        """bool [num_steps]: which steps draw fresh noise (diffusers' draw order: DDPM at every t > 0,
        DDIM at every step when eta > 0)."""
        if sampler == "ddim":
            return np.full((num_steps,), float(eta) > 0)
        return self.timesteps(num_steps) > 0


def _torch_linspace(start, end, n):
    """float32 linspace bit-equal to torch's, which diffusers' linear schedules use: a float32 step,
    each half stepped from its own end with one rounding (a fused multiply-add, exact in float64).
    NumPy's linspace differs in the last bit for a third of the entries."""
    start, end = np.float32(start), np.float32(end)
    step = np.float64((end - start) / np.float32(max(n - 1, 1)))
    i = np.arange(n, dtype=np.float64)
    return np.where(i < n // 2, np.float64(start) + step * i, np.float64(end) - step * (n - 1 - i)).astype(np.float32)


def check_sampler(sampler, eta=0.0):
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got sampler={sampler!r}")
    if float(eta) < 0:
        raise ValueError(f"eta must be >= 0, got eta={eta!r}")


def _bcast(a, x):
    return jnp.reshape(a, (-1,) + (1,) * (x.ndim - 1))


def add_noise(schedule: DiscreteSchedule, x, noise, t):
    """q(x_t | x_0) at integer timesteps t [B] (diffusers' add_noise): sqrt(abar) x + sqrt(1-abar) z."""
    acp = jnp.asarray(schedule.alphas_cumprod())[jnp.asarray(t)]
    return _bcast(jnp.sqrt(acp), x) * x + _bcast(jnp.sqrt(1.0 - acp), x) * noise


def threshold(schedule: DiscreteSchedule, x0):
    """IF's dynamic thresholding (thresholding=True) or the static clip (clip_sample), per sample:
    s = the `dynamic_thresholding_ratio` quantile of |x0| over all pixels and channels, clamped to
    [1, sample_max_value]; x0 -> clip(x0, -s, s) / s. Thresholding takes precedence over clipping."""
    if schedule.thresholding:
        flat = jnp.abs(x0.astype(jnp.float32)).reshape(x0.shape[0], -1)
        s = jnp.quantile(flat, schedule.dynamic_thresholding_ratio, axis=1, method="linear")
        s = _bcast(jnp.clip(s, 1.0, schedule.sample_max_value), x0)
        return (jnp.clip(x0, -s, s) / s).astype(x0.dtype)
    if schedule.clip_sample:
        return jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    return x0


def _to_x0_eps(schedule, out, x, a_t):
    b_t = 1.0 - a_t
    if schedule.prediction_type == "epsilon":
        return (x - jnp.sqrt(b_t) * out) / jnp.sqrt(a_t), out
    if schedule.prediction_type == "sample":
        return out, (x - jnp.sqrt(a_t) * out) / jnp.sqrt(b_t)
    return jnp.sqrt(a_t) * x - jnp.sqrt(b_t) * out, jnp.sqrt(a_t) * out + jnp.sqrt(b_t) * x


def ddpm_step(schedule: DiscreteSchedule, out, t, prev_t, x, z):
    """One ancestral step t -> prev_t (scalars; prev_t = -1 ends the chain) of diffusers' DDPMScheduler.
    out [B, H, W, C or 2C]: with 2C channels the last C are the variance (read by learned types only).
    z: the step's standard normal noise [B, H, W, C], used only when t > 0."""
    acp = jnp.asarray(schedule.alphas_cumprod())
    c = x.shape[-1]
    pred_var = None
    if out.shape[-1] == 2 * c:  # a fixed variance type ignores the network's variance (as IF's pipelines do)
        out, pred_var = out[..., :c], out[..., c:]
    a_t = acp[t]
    a_p = jnp.where(prev_t >= 0, acp[jnp.maximum(prev_t, 0)], jnp.float32(1.0))
    b_t, b_p = 1.0 - a_t, 1.0 - a_p
    cur_a = a_t / a_p
    cur_b = 1.0 - cur_a
    x0, _ = _to_x0_eps(schedule, out, x, a_t)
    x0 = threshold(schedule, x0)
    mean = (jnp.sqrt(a_p) * cur_b / b_t) * x0 + (jnp.sqrt(cur_a) * b_p / b_t) * x
    var = jnp.maximum(b_p / b_t * cur_b, 1e-20)
    vt = schedule.variance_type
    if vt == "learned_range" and pred_var is not None:
        frac = (pred_var + 1.0) / 2.0
        std = jnp.exp(0.5 * (frac * jnp.log(cur_b) + (1.0 - frac) * jnp.log(var)))
    elif vt == "learned" and pred_var is not None:
        std = jnp.sqrt(pred_var)
    elif vt == "fixed_small_log":
        std = jnp.exp(0.5 * jnp.log(var))
    elif vt == "fixed_large":
        std = jnp.sqrt(cur_b)
    else:
        std = jnp.sqrt(var)
    return jnp.where(t > 0, mean + std * z, mean)


def ddim_step(schedule: DiscreteSchedule, out, t, prev_t, x, z, eta=0.0):
    """One step t -> prev_t of diffusers' DDIMScheduler (use_clipped_model_output=False: the direction
    uses the network's eps, not the one re-derived from the thresholded x0). Any variance channels
    in `out` are dropped. z is used only when eta > 0."""
    acp = jnp.asarray(schedule.alphas_cumprod())
    c = x.shape[-1]
    out = out[..., :c]
    final = jnp.float32(1.0) if schedule.set_alpha_to_one else acp[0]
    a_t = acp[t]
    a_p = jnp.where(prev_t >= 0, acp[jnp.maximum(prev_t, 0)], final)
    b_t, b_p = 1.0 - a_t, 1.0 - a_p
    x0, eps = _to_x0_eps(schedule, out, x, a_t)
    x0 = threshold(schedule, x0)
    var = (b_p / b_t) * (1.0 - a_t / a_p)
    std = eta * jnp.sqrt(var)
    x_p = jnp.sqrt(a_p) * x0 + jnp.sqrt(1.0 - a_p - std**2) * eps
    return x_p + std * z


def sample_loop(denoise_fn, x_init, schedule: DiscreteSchedule, *, num_steps, sampler="ddpm", eta=0.0,
                rng=None, step_noise=None):
    """Runs the chain from `x_init` [B, H, W, C] (standard normal: diffusers' init_noise_sigma is 1)
    over `schedule.timesteps(num_steps)`; traceable, one `lax.scan`.

    Per-step noise comes from `step_noise` [num_steps, B, H, W, C] when given (entry i for step i;
    entries of steps that draw none are ignored), otherwise from `rng` (fold_in(rng, i) at step i).
    Returns x at the end of the chain: for DDPM with a last t of 0, the thresholded x0 itself.
    `eta` (DDIM) may be traced only when it is known to be > 0 or == 0 before tracing.
    """
    check_sampler(sampler, eta if not isinstance(eta, jax.core.Tracer) else 0.0)
    ts = jnp.asarray(schedule.timesteps(num_steps), jnp.int32)
    prev = jnp.asarray(schedule.prev_timesteps(num_steps, sampler), jnp.int32)
    draws = not isinstance(eta, jax.core.Tracer) and schedule.noised_steps(num_steps, sampler, eta).any()
    if step_noise is None and rng is None and draws:
        raise ValueError("sample_loop needs rng or step_noise")
    batch = x_init.shape[0]
    if step_noise is not None:
        step_noise = jnp.asarray(step_noise)

    def step(x, inputs):
        i, t, p = inputs
        out = denoise_fn(x, jnp.full((batch,), t, jnp.int32)).astype(jnp.float32)
        if step_noise is not None:
            z = step_noise[i].astype(jnp.float32)
        elif rng is None:  # no step draws noise
            z = jnp.zeros(x.shape, jnp.float32)
        else:
            z = keys.normal(keys.fold_in(rng, i), x.shape)  # rng: one key, or one per example
        if sampler == "ddpm":
            x = ddpm_step(schedule, out, t, p, x, z)
        else:
            x = ddim_step(schedule, out, t, p, x, z, eta)
        return x.astype(jnp.float32), None

    x, _ = jax.lax.scan(step, x_init.astype(jnp.float32), (jnp.arange(num_steps), ts, prev))
    return x


def expand_step_noise(schedule: DiscreteSchedule, num_steps, noises, *, sampler="ddpm", eta=0.0):
    """Injected per-step noise in diffusers' draw order (one array per step that draws, see
    `noised_steps`) -> the [num_steps, ...] array `sample_loop` takes (zeros where none is drawn)."""
    drawn = schedule.noised_steps(num_steps, sampler, eta)
    noises = [np.asarray(z, np.float32) for z in noises]
    if len(noises) != int(drawn.sum()):
        raise ValueError(f"{int(drawn.sum())} per-step noise arrays are drawn by {num_steps} {sampler} steps "
                         f"(timesteps {schedule.timesteps(num_steps).tolist()[:4]}...), got {len(noises)}")
    if not noises:
        return None
    shape = noises[0].shape
    if any(z.shape != shape for z in noises):
        raise ValueError(f"per-step noise arrays differ in shape: {sorted({z.shape for z in noises})}")
    out = np.zeros((num_steps,) + shape, np.float32)
    out[drawn] = np.stack(noises)
    return out


def guided_split(model_fn, guidance_scale, channels, cond_fn=None):
    """IF's classifier-free guidance. `model_fn(x [2B], t [2B]) -> out [2B, ..., K]` whose first half
    is unconditional and second half conditional (diffusers' order) -> `denoise_fn(x [B], t [B])`.
    Guidance acts on the first `channels` outputs (eps); the rest (learned variance) are the
    conditional branch's. `guidance_scale` may be traced.

    With `cond_fn(x [B], t [B])` (the conditional half alone), a weight of exactly 1, where the
    guided output is the conditional one, runs only that half (a `lax.cond` on the traced weight:
    one compiled program, half the U-Net work at w = 1)."""

    def both(x, t):
        out = model_fn(jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0)).astype(jnp.float32)
        unc, cond = jnp.split(out, 2, axis=0)
        eps = unc[..., :channels] + guidance_scale * (cond[..., :channels] - unc[..., :channels])
        return jnp.concatenate([eps, cond[..., channels:]], axis=-1)

    if cond_fn is None:
        return both

    def denoise_fn(x, t):
        return jax.lax.cond(jnp.asarray(guidance_scale) == 1.0,
                            lambda: cond_fn(x, t).astype(jnp.float32), lambda: both(x, t))

    return denoise_fn
