"""DeepFloyd IF stages I and II in JAX, read from local diffusers-format pipeline directories.

    from imagen_jax import deepfloyd
    pipe = deepfloyd.IFPipeline.load("IF-I-XL-v1.0", "IF-II-L-v1.0", accept_license=True)
    prompt_embeds, negative_embeds = pipe.encode(prompts)     # [B, 77, D] each, HF T5 semantics
    images = pipe.sample(prompts, steps=(100, 50), guidance=(7.0, 4.0), noise_level=250, seed=0)
    # -> [stage I [B, 64, 64, 3], stage II [B, 256, 256, 3]], NHWC float32 in [-1, 1]

Each stage is data (its U-Net, its discrete noise process, its conditioning convention), sampled by
`IFStageSampler`, which has the call signature of cascade.StageSampler, so IF stages join the same
cascade as Imagen's (`imagen_jax.sample --stages IF_I_DIR,IF_II_DIR --accept_license`).

Stage II conditioning follows diffusers' IFSuperResolutionPipeline: stage I's output is upscaled
bilinearly with align_corners=True, noised once at the integer `noise_level` through the
image_noising_scheduler, concatenated to x on channels and fed `noise_level` as the class label.

`noise` replays a diffusers run: one list per stage, in diffusers' draw order (stage I: the initial
noise, then one array per step whose t > 0; stage II: the initial noise, the augmentation noise,
then one per step whose t > 0), NHWC.

The weights are under the DeepFloyd IF License (non-commercial research only); nothing is downloaded.
"""
import dataclasses
import json
import os
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import parallel, paths
from imagen_jax.diffusion import discrete, keys
from imagen_jax.models import deepfloyd_if
from imagen_jax.text import hf_t5

ATTRIBUTION = "DeepFloyd is licensed under the DeepFloyd License, Copyright (c) Stability AI Ltd. All Rights Reserved."
LICENSE_HINT = ("the DeepFloyd IF weights are under the DeepFloyd IF License Agreement (non-commercial research "
                "only; the LICENSE file in each model repository, e.g. huggingface.co/DeepFloyd/IF-I-XL-v1.0): "
                "accept it on the model card, download the weights yourself, and pass accept_license=True "
                "(--accept_license)")
STAGE_CLASSES = {"IFPipeline": "I", "IFSuperResolutionPipeline": "II"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class IFError(ValueError):
    pass


class LicenseNotAcceptedError(IFError):
    pass


def check_license(accept_license):
    if accept_license is not True:
        raise LicenseNotAcceptedError(f"not loading: {LICENSE_HINT}")


def is_if_stage(path) -> bool:
    """A diffusers pipeline directory (model_index.json) rather than an imagen_jax workdir/bundle."""
    from imagen_jax import paths
    return paths.isfile(paths.join(os.fspath(path), "model_index.json"))


def _need(path, what):
    if not os.path.exists(path):
        raise IFError(f"{path}: missing; expected {what}")
    return path


def stage_kind(stage_dir) -> str:
    """'I' or 'II' from model_index.json's _class_name."""
    stage_dir = os.fspath(stage_dir)
    if not os.path.isdir(stage_dir):
        raise IFError(f"{stage_dir}: no such directory; expected a DeepFloyd IF pipeline directory "
                      "(model_index.json, unet/, scheduler/, text_encoder/, tokenizer/) downloaded by you")
    path = _need(os.path.join(stage_dir, "model_index.json"), "the diffusers pipeline index (model_index.json)")
    try:
        with open(path) as f:
            name = json.load(f).get("_class_name")
    except (ValueError, AttributeError) as e:
        raise IFError(f"{path}: not a diffusers model_index.json ({e})") from None
    if name not in STAGE_CLASSES:
        raise IFError(f"{path}: _class_name={name!r} is not an IF stage; expected one of {sorted(STAGE_CLASSES)}")
    return STAGE_CLASSES[name]


# What loading a pipeline directory reads (model_index.json beside them); safety_checker/,
# feature_extractor/, watermarker/ and pickled or 8-bit weights never are.
_READ_PARTS = ("unet", "scheduler", "image_noising_scheduler", "text_encoder", "tokenizer")
_UNREAD = (".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".onnx_data")
_FP16 = re.compile(r"\.fp16[.-]")


def staged_files(files, dtype) -> list:
    """The files (relative paths of a pipeline directory) that loading it in `dtype` reads: U-Net
    weights in the variant `deepfloyd_if.load_unet` prefers (fp16 for float16, else full precision,
    the other only when alone), the T5 encoder's full-precision set unless only fp16 is there."""
    keep = [f for f in files if ("/" not in f and f.endswith(".json"))
            or (f.split("/", 1)[0] in _READ_PARTS and not f.endswith(_UNREAD) and ".8bit." not in f)]

    def one_variant(part, prefer_fp16):
        weights = [f for f in keep if f.startswith(part + "/") and ".safetensors" in f]
        half = [f for f in weights if _FP16.search(f.rsplit("/", 1)[-1])]
        full = [f for f in weights if f not in half]
        if half and full:
            drop = set(full if prefer_fp16 else half)
            keep[:] = [f for f in keep if f not in drop]

    one_variant("unet", jnp.dtype(_dtype(dtype)) == jnp.float16)
    one_variant("text_encoder", False)
    return keep


def local_stage_dir(stage_dir, dtype="float32") -> str:
    """A local directory with what loading `stage_dir` reads: the directory itself when local; for
    gs:// a per-process mirror of `staged_files` (safetensors are memory-mapped local files)."""
    stage_dir = os.fspath(stage_dir)
    if not paths.is_remote(stage_dir):
        return stage_dir
    if not paths.isdir(stage_dir):
        raise IFError(f"{stage_dir}: no such directory; expected a DeepFloyd IF pipeline directory "
                      "(model_index.json, unet/, scheduler/, text_encoder/, tokenizer/)")
    return paths.local_dir(stage_dir, staged_files(paths.list_files(stage_dir), dtype))


def _dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise IFError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


@dataclasses.dataclass
class IFStage:
    """One IF stage: its U-Net and parameters, its noise process, and where its text comes from."""

    source: str
    kind: str                       # "I" (text -> 64x64) or "II" (super-resolution)
    module: Any
    params: Any
    schedule: discrete.DiscreteSchedule
    noising: Optional[discrete.DiscreteSchedule]  # stage II's image_noising_scheduler
    has_text_encoder: bool
    step: int = -1                  # the cascade's Stage.step; a released pipeline has none
    family: str = "deepfloyd_if"
    files: str = ""                 # where its files are read: `source`, or a local mirror of a gs:// one

    @property
    def image_size(self):
        return int(self.module.config.sample_size)

    @property
    def is_sr(self):
        return self.kind == "II"

    @property
    def lowres_size(self):
        # 0: any. Stage II upscales whatever it is given to its own size (IF-II-L is trained 64 -> 256),
        # so it may follow any smaller stage (cascade.check_chain).
        return 0

    @property
    def text_dim(self):
        return int(self.module.config.text_dim)

    @classmethod
    def load(cls, stage_dir, *, dtype="float32", accept_license=False, expect=None, mesh=None):
        check_license(accept_license)
        source = os.fspath(stage_dir)
        local = local_stage_dir(source, dtype)
        try:
            return cls._load(source, local, dtype, expect, mesh)
        except (IFError, deepfloyd_if.IFConfigError, hf_t5.TextLayoutError) as e:
            if local == source:
                raise
            raise type(e)(str(e).replace(local, source)) from None  # name the gs:// path, not the mirror

    @classmethod
    def _load(cls, source, stage_dir, dtype, expect, mesh):
        kind = stage_kind(stage_dir)
        if expect is not None and kind != expect:
            other = {"I": "a stage I (text-to-image, IFPipeline)", "II": "a stage II (super-resolution, "
                     "IFSuperResolutionPipeline)"}
            raise IFError(f"{stage_dir} is {other[kind]} directory, but {other[expect]} is expected here")
        unet_dir = os.path.join(stage_dir, "unet")
        _need(os.path.join(unet_dir, "config.json"), "the U-Net's config.json (unet/config.json)")
        schedule = discrete.DiscreteSchedule.from_json(_need(
            os.path.join(stage_dir, "scheduler", "scheduler_config.json"),
            "the DDPM scheduler config (scheduler/scheduler_config.json)"))
        noising = None
        if kind == "II":
            noising = discrete.DiscreteSchedule.from_json(_need(
                os.path.join(stage_dir, "image_noising_scheduler", "scheduler_config.json"),
                "stage II's noise-augmentation scheduler (image_noising_scheduler/scheduler_config.json)"))
        has_text = hf_t5.text_paths(stage_dir) is not None
        module, params = deepfloyd_if.load_unet(unet_dir, _dtype(dtype))
        if mesh is not None:
            params = jax.device_put(params, parallel.replicated(mesh))
        return cls(source=source, kind=kind, module=module, params=params, schedule=schedule,
                   noising=noising, has_text_encoder=has_text, files=stage_dir)


def upscale_align_corners(x, size):
    """Bilinear resize [B, h, w, C] -> [B, size, size, C] with align_corners=True (torch's
    F.interpolate, as IF's stage II pipeline upscales); jax.image.resize uses half-pixel centres."""
    def matrix(n_in, n_out):
        scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0)
        src = np.arange(n_out, dtype=np.float32) * scale
        lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        w1 = (src - lo).astype(np.float32)
        m = np.zeros((n_out, n_in), np.float32)
        m[np.arange(n_out), lo] += 1 - w1
        m[np.arange(n_out), hi] += w1
        return jnp.asarray(m)

    x = jnp.asarray(x, jnp.float32)
    rows, cols = matrix(x.shape[1], size), matrix(x.shape[2], size)
    x = jnp.einsum("oh,bhwc->bowc", rows, x, precision="highest")
    return jnp.einsum("pw,bowc->bopc", cols, x, precision="highest")


@dataclasses.dataclass(frozen=True)
class IFSettings:
    sampler: str = "ddpm"
    steps: int = 100
    guidance: float = 7.0
    eta: float = 0.0
    noise_level: int = 250


class IFStageSampler:
    """One jitted program per stage: (embeddings [B, L, D], lowres [B, h, w, 3] | None, rng) ->
    images [B, S, S, 3] in [-1, 1]; the negative (unconditional) embedding is held by the sampler.
    Same call signature as cascade.StageSampler (the mask is unused: IF reads every text row).
    Guidance and noise level are traced: a guidance sweep reuses the compiled program."""

    def __init__(self, stage: IFStage, settings: IFSettings, negative, mesh=None):
        discrete.check_sampler(settings.sampler, settings.eta)
        stage.schedule.timesteps(settings.steps)  # validates the step count
        if stage.is_sr and not 0 <= int(settings.noise_level) < stage.noising.num_train_timesteps:
            raise IFError(f"noise_level must be an integer in [0, {stage.noising.num_train_timesteps}), "
                          f"got {settings.noise_level}")
        self.stage, self.settings, self.mesh = stage, settings, mesh
        self.negative = jnp.asarray(negative, jnp.float32).reshape((1,) + tuple(np.shape(negative)[-2:]))
        self._fn = jax.jit(self._sample)

    def _sample(self, params, emb, lowres, x_init, aug_noise, step_noise, rng, guidance, noise_level):
        st, s = self.stage, self.settings
        b = emb.shape[0]
        text2 = jnp.concatenate([jnp.broadcast_to(self.negative, emb.shape).astype(emb.dtype), emb], 0)
        up, level = None, None
        if st.is_sr:
            up = upscale_align_corners(lowres, st.image_size)
            level = jnp.full((b,), noise_level, jnp.int32)
            up = discrete.add_noise(st.noising, up, aug_noise, level)

        def run(x, t, text, copies):
            if up is not None:  # [x ; noised low-res] on channels, as diffusers
                x = jnp.concatenate([x, jnp.concatenate([up] * copies, 0)], -1)
            labels = None if level is None else jnp.concatenate([level] * copies, 0)
            return st.module.apply({"params": params}, x, t, text, noise_level=labels)

        def model_fn(x, t):  # [negative; prompt] in one batch of 2B
            return run(x, t, text2, 2)

        def cond_fn(x, t):  # the prompt half alone: guidance 1 skips the negative pass (diffusers: no CFG)
            return run(x, t, emb, 1)

        denoise = discrete.guided_split(model_fn, guidance, x_init.shape[-1], cond_fn)
        return discrete.sample_loop(denoise, x_init, st.schedule, num_steps=s.steps, sampler=s.sampler, eta=s.eta,
                                    rng=rng, step_noise=step_noise)

    def noise_shapes(self, batch):
        size = self.stage.image_size
        return (batch, size, size, 3)

    def __call__(self, text, mask=None, lowres=None, rng=None, *, noise=None, guidance=None, noise_level=None):
        """text: embeddings [B, L, D]; noise: this stage's injected arrays (diffusers' draw order);
        guidance / noise_level: override the settings' without recompiling."""
        st, s = self.stage, self.settings
        del mask
        text = jnp.asarray(text, jnp.float32)
        b = text.shape[0]
        shape = self.noise_shapes(b)
        if st.is_sr and lowres is None:
            raise IFError(f"{st.source}: a stage II needs the previous stage's images")
        step_noise = None
        if noise is not None:
            noise = list(noise)
            head = 2 if st.is_sr else 1
            if len(noise) < head:
                raise IFError(f"stage {st.kind} noise needs at least {head} arrays (initial"
                              f"{', augmentation' if st.is_sr else ''}), got {len(noise)}")
            x_init = jnp.asarray(noise[0], jnp.float32)
            aug = jnp.asarray(noise[1], jnp.float32) if st.is_sr else jnp.zeros(shape, jnp.float32)
            step_noise = discrete.expand_step_noise(st.schedule, s.steps, noise[head:], sampler=s.sampler, eta=s.eta)
            if x_init.shape != shape:
                raise IFError(f"stage {st.kind} initial noise has shape {x_init.shape}, expected {shape}")
            rng = jax.random.PRNGKey(0)  # unused: every draw is injected
        else:
            if rng is None:
                raise IFError("pass rng or noise")
            k_init, k_aug, rng = keys.split(jnp.asarray(rng), 3)  # one key, or one per image
            x_init = keys.normal(k_init, shape)
            aug = keys.normal(k_aug, shape)
        lowres = jnp.asarray(lowres, jnp.float32) if lowres is not None else jnp.zeros((), jnp.float32)
        if self.mesh is not None:
            put = lambda a: jax.device_put(a, parallel.batch_sharding(self.mesh, a.ndim))  # noqa: E731
            text, x_init, aug = put(text), put(x_init), put(aug)
            if st.is_sr:
                lowres = put(lowres)
        guidance = s.guidance if guidance is None else guidance
        noise_level = s.noise_level if noise_level is None else int(noise_level)
        if st.is_sr and not 0 <= noise_level < st.noising.num_train_timesteps:
            raise IFError(f"noise_level must be an integer in [0, {st.noising.num_train_timesteps}), got {noise_level}")
        return self._fn(st.params, text, lowres, x_init, aug, step_noise, rng, jnp.float32(guidance),
                        jnp.int32(noise_level))


def default_settings(stage: IFStage) -> IFSettings:
    """diffusers' defaults: stage I 100 steps, guidance 7; stage II 50 steps, guidance 4, noise level 250."""
    return IFSettings(steps=50, guidance=4.0) if stage.is_sr else IFSettings()


class IFPipeline:
    """Stage I, optionally stage II, and the T5 encoder (stage I's, or stage II's if it has one)."""

    def __init__(self, stages, encoder):
        self.stages = list(stages)
        self.encoder = encoder
        self._samplers = {}

    @classmethod
    def load(cls, stage_I_dir, stage_II_dir=None, *, dtype="float32", accept_license=False):
        check_license(accept_license)
        dt = _dtype(dtype)
        stages = [IFStage.load(stage_I_dir, dtype=dt, accept_license=True, expect="I")]
        if stage_II_dir is not None:
            stages.append(IFStage.load(stage_II_dir, dtype=dt, accept_license=True, expect="II"))
        return cls(stages, load_text_encoder(stages, dtype=dt))

    def sampler(self, k, settings, negative):
        """Stage k's sampler, compiled once per (sampler, steps, eta): guidance and noise level are
        traced and given at call time."""
        key = (k, settings.sampler, settings.steps, settings.eta)
        if key not in self._samplers:
            self._samplers[key] = IFStageSampler(self.stages[k], settings, negative)
        return self._samplers[key]

    def encode(self, prompts: Sequence[str]):
        """-> (prompt_embeds, negative_embeds), float32 [B, 77, D] each (negative: T5 of "")."""
        return hf_t5.encode_with_negative(self.encoder, _prompt_list(prompts))

    def sample(self, prompts, *, steps=(100, 50), guidance=(7.0, 4.0), noise_level=250, seed=0, noise=None,
               sampler="ddpm", eta=0.0):
        """-> a list with one NHWC float32 array per stage run ([-1, 1]; diffusers' output_type="pt"
        values). One value of steps/guidance per stage; a 1-tuple runs stage I only."""
        steps, guidance = _tuple(steps, "steps"), _tuple(guidance, "guidance")
        n = len(steps)
        if len(guidance) != n:
            raise IFError(f"steps has {n} values but guidance {len(guidance)}: give one of each per stage")
        if n > len(self.stages):
            raise IFError(f"{n} stages asked for (steps={steps}) but only {len(self.stages)} loaded")
        if noise is not None and len(noise) != n:
            raise IFError(f"noise has {len(noise)} entries, expected one list per stage run ({n})")
        emb, neg = self.encode(prompts)
        rng = jax.random.PRNGKey(seed)
        out, lowres = [], None
        for k in range(n):
            settings = IFSettings(sampler=sampler, steps=int(steps[k]), guidance=float(guidance[k]), eta=eta,
                                  noise_level=int(noise_level))
            lowres = self.sampler(k, settings, neg[:1])(emb, None, lowres, jax.random.fold_in(rng, k),
                                                       noise=None if noise is None else noise[k],
                                                       guidance=settings.guidance, noise_level=settings.noise_level)
            out.append(np.asarray(lowres, np.float32))
        return out


def load_text_encoder(stages, *, dtype=jnp.float32, mesh=None):
    """The T5 of the first IF stage that has one (stage II downloads may lack it). T5 in float16
    overflows (HF keeps `wo` in float32 and clamps infs for it), so reduced precision means bfloat16."""
    for st in stages:
        if st.has_text_encoder:
            t5_dtype = jnp.float32 if jnp.dtype(dtype) == jnp.float32 else jnp.bfloat16
            return hf_t5.load_encoder(st.files or st.source, dtype=t5_dtype, mesh=mesh)
    raise IFError(f"none of {[s.source for s in stages]} has text_encoder/ and tokenizer/ (IF stage I's T5)")


def _prompt_list(prompts):
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise IFError(f"prompts must be a non-empty list of strings, got {prompts!r}"[:200])
    return prompts


def _tuple(v, name):
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if not 1 <= len(v) <= 2:
        raise IFError(f"{name} must have one value per stage (1 or 2), got {v}")
    return v


__all__ = ["ATTRIBUTION", "IFError", "IFPipeline", "IFSettings", "IFStage", "IFStageSampler",
           "LicenseNotAcceptedError", "check_license", "default_settings", "is_if_stage", "load_text_encoder",
           "stage_kind", "upscale_align_corners"]
