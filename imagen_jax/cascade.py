"""Cascade sampling: T5 embeddings -> base stage -> super-resolution stages, one jitted sampling
program per stage, data-parallel over the mesh. The one sampler path used by training previews,
`imagen_jax.sample`, FID evaluation and the demo."""
import copy
import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import checkpoints, diffusion, parallel, paths
from imagen_jax.diffusion import keys, schedules
from imagen_jax.models import TEXT_CACHE, UNet, UNetConfig, cast_kernels, init_inputs, text_cache, upsample_lowres


class CascadeError(ValueError):
    pass


@dataclasses.dataclass
class Stage:
    """One trained stage: its config, U-Net and (EMA) parameters placed on a mesh."""

    config: Any
    params: Any
    source: str
    step: int

    @property
    def model_cfg(self):
        return UNetConfig.from_dict(self.config.model.to_dict())

    @property
    def image_size(self):
        """Output side at sampling time: the full size for crop-trained stages (SR1024)."""
        return int(self.config.data.full_size or self.config.data.image_size)

    @property
    def lowres_size(self):
        return int(self.config.diffusion.lowres_size)

    @property
    def is_sr(self):
        return self.lowres_size > 0


def param_shardings(config, mesh):
    model_cfg = UNetConfig.from_dict(config.model.to_dict())
    model = UNet(model_cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **init_inputs(model_cfg, text_len=8))["params"])
    return nn.meta.unbox(boxed), parallel.logical_shardings(boxed, mesh, config.mesh.rules)


DTYPES = ("float32", "bfloat16", "float16")


def _with_compute_dtype(config, dtype):
    if dtype is not None:
        config = config.copy_and_resolve_references()
        config.model.dtype = dtype
    return config


def load_stage(path, mesh, *, step=None, which="ema_params", accept_license=False, dtype=None):
    """A stage from a training workdir (latest or given checkpoint, EMA params by default), from
    an exported bundle (a directory with info.json), or a DeepFloyd IF stage from a diffusers
    pipeline directory (model_index.json; needs accept_license=True, see imagen_jax.deepfloyd).

    dtype (None | one of DTYPES): an IF stage's weights and compute (None: float32, as diffusers
    loads); an Imagen stage's compute dtype in place of its config's model.dtype (None: the config's;
    its parameters stay float32, as they were trained)."""
    if dtype is not None and dtype not in DTYPES:
        raise CascadeError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not paths.isdir(path):
        raise CascadeError(f"stage directory {path} does not exist")
    from imagen_jax import deepfloyd
    if deepfloyd.is_if_stage(path):
        return deepfloyd.IFStage.load(path, dtype=dtype or "float32", accept_license=accept_license, mesh=mesh)
    if paths.exists(paths.join(path, "info.json")):
        from imagen_jax import bundle
        config, params, info = bundle.load(path, mesh=mesh)
        return Stage(config=_with_compute_dtype(config, dtype), params=params, source=path,
                     step=int(info.get("step", -1)))
    config = _with_compute_dtype(checkpoints.load_config(path), dtype)
    abstract, shardings = param_shardings(config, mesh)
    params, step = checkpoints.restore_params(path, abstract, shardings, step=step, which=which)
    return Stage(config=config, params=params, source=path, step=step)


def stage_dtype(stage) -> str:
    """What a stage computes in: an IF stage's weight dtype, an Imagen stage's model.dtype."""
    if getattr(stage, "family", "imagen") == "deepfloyd_if":
        return str(jax.tree_util.tree_leaves(stage.params)[0].dtype)
    return str(stage.config.model.get("dtype", "float32"))


def check_chain(stages):
    """Stage k+1 must take stage k's output as its low-res input."""
    if not stages:
        raise CascadeError("no stages given")
    if stages[0].is_sr:
        raise CascadeError(f"the first stage ({stages[0].source}) is a super-resolution stage; "
                           "give the base stage first")
    for prev, nxt in zip(stages, stages[1:]):
        if not nxt.is_sr:
            raise CascadeError(f"stage {nxt.source} is not a super-resolution stage, but follows {prev.source}")
        if not nxt.lowres_size:  # IF stage II upscales whatever it is given; it must still upscale
            if prev.image_size >= nxt.image_size:
                raise CascadeError(f"stage {nxt.source} outputs {nxt.image_size}x{nxt.image_size}, no larger than "
                                   f"its input from {prev.source} ({prev.image_size}x{prev.image_size})")
        elif nxt.lowres_size != prev.image_size:
            raise CascadeError(f"stage {nxt.source} expects {nxt.lowres_size}x{nxt.lowres_size} inputs but "
                               f"{prev.source} outputs {prev.image_size}x{prev.image_size}: stages in the wrong order?")
    # Each family encodes text its own way (IF: its own T5), so widths need only agree within one.
    dims = {int(s.config.model.text_dim) for s in stages if getattr(s, "family", "imagen") == "imagen"}
    if len(dims) > 1:
        raise CascadeError(f"stages disagree on the text width: {sorted(dims)}")


@dataclasses.dataclass(frozen=True)
class StageSettings:
    sampler: str = "ddpm"
    steps: int = 256
    guidance: float = 1.0
    thresholding: str = "dynamic"
    percentile: float = 99.5
    eta: float = 0.0
    aug_level: float = 0.0


class StageSampler:
    """One jitted program: (params, text, mask, lowres, rng, guidance, aug_level, percentile) ->
    images [B, S, S, 3] in [-1, 1]. Guidance, augmentation level and percentile are traced, so
    changing them (a guidance sweep) reuses the compiled program."""

    def __init__(self, stage: Stage, mesh, settings: StageSettings):
        diffusion.samplers.check_sampler_args(
            schedule=stage.config.diffusion.schedule, sampler=settings.sampler, num_steps=settings.steps,
            eta=settings.eta, thresholding=settings.thresholding, percentile=settings.percentile,
            prediction=stage.config.diffusion.prediction)
        if not 0.0 <= settings.aug_level <= 1.0:
            raise CascadeError(f"aug_level must be in [0, 1], got {settings.aug_level}")
        self.stage, self.mesh, self.settings = stage, mesh, settings
        self.model = UNet(stage.model_cfg)
        self.rules = parallel.rules_tuple(stage.config.mesh.rules)
        batch = lambda nd: parallel.batch_sharding(mesh, nd)  # noqa: E731
        param_sh = jax.tree_util.tree_map(lambda x: x.sharding, stage.params)
        rep = parallel.replicated(mesh)
        self._fn = jax.jit(self._sample, in_shardings=(param_sh, batch(3), batch(2), batch(4) if stage.is_sr else rep,
                                                       rep, rep, rep, rep),
                           out_shardings=batch(4))

    def _sample(self, params, text, mask, lowres, rng, guidance, aug_level, percentile):
        st, s = self.stage, self.settings
        b, size = text.shape[0], self.stage.image_size
        params = cast_kernels(st.model_cfg, params)  # once, not at every step of the loop
        text2 = jnp.concatenate([text, jnp.zeros_like(text)], 0)  # [cond; null] in one batch
        mask2 = jnp.concatenate([mask, jnp.zeros_like(mask)], 0)
        with nn.logical_axis_rules(self.rules):  # the text's projections, once for the whole loop
            cache = text_cache(self.model, params, text2, mask2)
        half_cache = jax.tree_util.tree_map(lambda a: a[:b], cache)
        kw = {}
        init_rng, loop_rng, aug_rng = keys.split(rng, 3)  # rng: one key, or one per image
        if st.is_sr:
            up = upsample_lowres(lowres, size)
            aug = jnp.full((b,), schedules.aug_logsnr(aug_level))  # the same level -> noise on every stage
            up = schedules.q_sample(up, aug, keys.normal(aug_rng, up.shape))
            kw = dict(lowres=jnp.concatenate([up, up], 0), lowres_logsnr=jnp.concatenate([aug, aug], 0))

        def model_fn(x, logsnr):
            with nn.logical_axis_rules(self.rules):
                return self.model.apply({"params": params, TEXT_CACHE: cache}, x, logsnr, text2, mask2, **kw)

        def cond_fn(x, logsnr):  # the conditional half alone: guidance 1 skips the null-text pass
            half = {k: v[:b] for k, v in kw.items()}
            with nn.logical_axis_rules(self.rules):
                return self.model.apply({"params": params, TEXT_CACHE: half_cache}, x, logsnr, text, mask, **half)

        x_init = keys.normal(init_rng, (b, size, size, 3))
        return diffusion.sample_loop(diffusion.guided(model_fn, guidance, cond_fn), x_init, loop_rng,
                                     schedule=st.config.diffusion.schedule, sampler=s.sampler, num_steps=s.steps,
                                     eta=s.eta, thresholding=s.thresholding, percentile=percentile,
                                     prediction=st.config.diffusion.prediction)

    def _args(self, text, mask, lowres, rng):
        s = self.settings
        batch = lambda a: parallel.to_global(a, parallel.batch_sharding(self.mesh, np.ndim(a)))  # noqa: E731
        rep = lambda a: parallel.to_global(a, parallel.replicated(self.mesh))  # noqa: E731
        lowres = rep(jnp.zeros((), jnp.float32)) if lowres is None else batch(lowres)
        return (self.stage.params, batch(text), batch(mask), lowres, rep(rng), jnp.float32(s.guidance),
                jnp.float32(s.aug_level), jnp.float32(s.percentile))

    def __call__(self, text, mask, lowres, rng):
        return self._fn(*self._args(text, mask, lowres, rng))

    def with_params(self, params, step=None):
        """This sampler for other parameters of the same shapes and shardings (a training run's
        EMA parameters at each preview), sharing the jitted program: no second compile."""
        other = copy.copy(self)
        other.stage = dataclasses.replace(self.stage, params=params,
                                          step=self.stage.step if step is None else step)
        return other

    def lower(self, text, mask, lowres, rng):
        """The jitted program lowered for these inputs (`.compile().as_text()`: the optimised HLO)."""
        return self._fn.lower(*self._args(text, mask, lowres, rng))


def pad_batch(x, multiple):
    pad = -x.shape[0] % multiple
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    return x, pad


def make_sampler(stage, mesh, settings, negative=None):
    """The stage's sampling program: what differs per family (network, noise process, text
    convention) is data on the stage; every sampler is called the same way by run_cascade."""
    if getattr(stage, "family", "imagen") == "deepfloyd_if":
        from imagen_jax import deepfloyd
        return deepfloyd.IFStageSampler(stage, settings, negative, mesh=mesh)
    return StageSampler(stage, mesh, settings)


def run_cascade(samplers, text, mask, seed, *, batch_size=None, log=print, progress=True, image_ids=None):
    """Samples every stage in turn for all prompts' embeddings (text [N, L, D], mask [N, L]; or one
    (text, mask) per stage as lists, when stages of different families read different encoders).

    Returns a list with each stage's images, uint8 [N, S, S, 3], and the seconds each stage took.
    Batches are padded to a multiple of the data-parallel size. Every image draws its noise from its
    own key, keys.per_image(seed, stage, image_ids[i]) (image_ids default 0..N-1), so image i depends
    only on (seed, its id, its inputs and the settings): not on the batch size, its place in the
    batch or the device count.
    """
    from tqdm import tqdm

    mesh = samplers[0].mesh
    dp = parallel.data_parallel_size(mesh)
    texts = list(text) if isinstance(text, (list, tuple)) else [text] * len(samplers)
    masks = list(mask) if isinstance(mask, (list, tuple)) else [mask] * len(samplers)
    n = texts[0].shape[0]
    ids = np.arange(n) if image_ids is None else np.asarray(image_ids)
    if ids.shape != (n,):
        raise CascadeError(f"image_ids must be [{n}] (one per prompt), got shape {ids.shape}")
    batch_size = batch_size or max(dp, min(n, 64))
    batch_size = -(-batch_size // dp) * dp
    outputs, times = [], []
    lowres_all = None
    for k, sampler in enumerate(samplers):
        text, mask = np.asarray(texts[k]), np.asarray(masks[k])
        t0 = time.time()
        chunks = []
        bar = tqdm(total=n, desc=f"stage {k + 1}/{len(samplers)} ({sampler.stage.image_size}px)",
                   disable=not progress or jax.process_index() != 0, unit="img")
        for start in range(0, n, batch_size):
            tb, pad = pad_batch(text[start:start + batch_size], dp)
            mb, _ = pad_batch(mask[start:start + batch_size], dp)
            lr = None
            if lowres_all is not None:
                lr, _ = pad_batch(lowres_all[start:start + batch_size], dp)
            ib, _ = pad_batch(ids[start:start + batch_size], dp)
            rng = keys.per_image(seed, k, ib)
            imgs = sampler(tb, mb, lr, rng)
            imgs = parallel.to_host(imgs)  # every host gets the whole batch (on a pod: gathered)
            chunks.append(imgs[: imgs.shape[0] - pad] if pad else imgs)
            bar.update(min(batch_size, n - start))
        bar.close()
        out = np.concatenate(chunks)
        lowres_all = out
        outputs.append(to_uint8(out))
        times.append(time.time() - t0)
        if log:
            log(f"stage {k + 1}: {n} images at {sampler.stage.image_size}x{sampler.stage.image_size} "
                f"in {times[-1]:.1f}s")
    return outputs, times


def to_uint8(images):
    """[-1, 1] float -> uint8 [0, 255]."""
    return np.asarray(np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255), np.uint8)


def grid(images, cols=None):
    """Contact sheet of uint8 [N, H, W, 3] images."""
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    sheet = np.full((rows * h, cols * w, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        sheet[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return sheet


__all__ = ["DTYPES", "CascadeError", "Stage", "StageSampler", "StageSettings", "check_chain", "grid", "load_stage",
           "make_sampler", "run_cascade", "stage_dtype", "to_uint8"]
