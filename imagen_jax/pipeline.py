"""Prompts -> images in Python (a notebook, a service): the cascade of stages, its text encoders
and its compiled samplers loaded once and kept across calls.

    import imagen_jax
    pipe = imagen_jax.Pipeline.load(["workdir_base64", "workdir_sr256"])   # or bundles, or IF dirs
    images = pipe(["a red circle", "a blue square"], num_images=2, seed=0, steps=(64, 32))
    # uint8 [4, 256, 256, 3], NHWC, prompt-major (prompt 0's images first)
    pipe.to_pil(images)[0].save("circle.png")

Imagen stages (workdirs, bundles) and DeepFloyd IF stages (diffusers pipeline directories, with
accept_license=True) are served alike: each stage's text by its family's convention
(sampling.StageConditioner), each stage sampled by its own program (cascade.make_sampler).
A second call with the same prompt count, images per prompt, batch size and static settings
(sampler, steps, eta, thresholding) reuses the compiled programs; guidance, percentile, aug_level
and noise_level are traced, so sweeping them does not recompile either. The sample CLI
(`imagen_jax.sample`, sampling.generate) is this pipeline plus writing PNGs and settings.json.
"""
import dataclasses

import numpy as np

from imagen_jax import cascade, parallel

# Settings a sampler program reads as traced arguments: changing them reuses its compilation.
TRACED_SETTINGS = ("guidance", "aug_level", "percentile", "noise_level")


@dataclasses.dataclass
class Result:
    """What one call made: every stage's uint8 images [N, S, S, 3], the settings used per stage,
    and the seconds each stage took."""

    images: list
    settings: list
    seconds: list


class Pipeline:
    """A loaded cascade. Build with Pipeline.load; call with prompts."""

    def __init__(self, stages, mesh, *, t5=None):
        cascade.check_chain(stages)
        self.stages, self.mesh, self.t5 = list(stages), mesh, t5
        self._cond, self._samplers = None, {}

    @property
    def cond(self):
        """The text encoders (sampling.StageConditioner), loaded on first use: a request with bad
        settings is refused before T5 is read."""
        if self._cond is None:
            from imagen_jax import sampling
            self._cond = sampling.StageConditioner(self.stages, t5=self.t5)
        return self._cond

    @classmethod
    def load(cls, stage_dirs, *, accept_license=False, dtype=None, t5=None, mesh=None):
        """stage_dirs: a list (or a comma-separated string) of stage directories, base first:
        training workdirs, exported bundles, or DeepFloyd IF diffusers pipeline directories (these
        need accept_license=True: the DeepFloyd IF License, non-commercial research only).
        dtype: None | float32 | bfloat16 | float16 (see cascade.load_stage). t5: a T5 checkpoint
        for prompts missing from a stage's embedding store. mesh: default, data-parallel over
        every device."""
        if isinstance(stage_dirs, str):
            stage_dirs = [d for d in stage_dirs.split(",") if d.strip()]
        stage_dirs = list(stage_dirs)
        if not stage_dirs:
            raise cascade.CascadeError("no stage directories given: pass them base first")
        mesh = mesh if mesh is not None else parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
        kw = {} if dtype is None else {"dtype": dtype}  # load_stage names a bad dtype
        stages = [cascade.load_stage(d, mesh, accept_license=accept_license, **kw) for d in stage_dirs]
        return cls(stages, mesh, t5=t5)

    @property
    def description(self) -> str:
        """Where each stage's text comes from (the text encoders)."""
        return self.cond.description

    @property
    def resolution(self) -> int:
        return self.stages[-1].image_size

    def settings(self, **setting_flags):
        """One settings object per stage: each stage's defaults (its config's `sampling`, diffusers'
        for IF) overridden by steps, guidance, sampler, eta, thresholding, percentile, aug_level,
        noise_level (one value for all stages, one per stage as a list/tuple or 'a,b' string)."""
        from imagen_jax import sampling

        flags = {k: _joined(v) for k, v in setting_flags.items()}
        if flags.get("eta") is None:
            flags.pop("eta", None)
        return sampling.settings_for(self.stages, **flags)

    def sampler(self, k, settings):
        """Stage k's sampler for `settings`. Its compiled program is shared with every earlier sampler
        of stage k whose static settings agree: the traced ones come from `settings` at call time."""
        fresh = cascade.make_sampler(self.stages[k], self.mesh, settings, self.cond.negative)
        static = tuple(sorted((f, v) for f, v in dataclasses.asdict(settings).items() if f not in TRACED_SETTINGS))
        key = (k, type(settings).__name__, static)
        cached = self._samplers.setdefault(key, fresh)
        if cached is not fresh:
            fresh._fn = cached._fn  # the jitted program reads only the static settings of its owner
        return fresh

    def run(self, prompts, *, num_images=1, seed=0, batch_size=None, progress=False, log=None,
            **setting_flags) -> Result:
        """Every stage's images for prompts (each repeated num_images times, prompt-major)."""
        prompts = _prompts(prompts)
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
            raise cascade.CascadeError(f"num_images must be an integer >= 1, got {num_images!r}")
        if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 0):
            raise cascade.CascadeError(f"batch_size must be None, 0 (up to 64) or a positive integer, got {batch_size!r}")
        settings = self.settings(**setting_flags)
        samplers = [self.sampler(k, s) for k, s in enumerate(settings)]
        texts, masks = self.cond([p for p in prompts for _ in range(num_images)])
        images, seconds = cascade.run_cascade(samplers, texts, masks, seed, batch_size=batch_size or None,
                                              log=log, progress=progress)
        return Result(images=images, settings=settings, seconds=seconds)

    def __call__(self, prompts, *, num_images=1, seed=0, steps=None, guidance=None, sampler=None, eta=None,
                 thresholding=None, percentile=None, aug_level=None, noise_level=None, batch_size=None,
                 progress=False, return_all=False):
        """prompts: a string or a list of strings. Returns the final stage's images, uint8
        [len(prompts) * num_images, S, S, 3] (prompt-major); return_all=True: a list with every
        stage's. Image i depends only on (seed, i, its prompt, the settings), not on the batching."""
        result = self.run(prompts, num_images=num_images, seed=seed, batch_size=batch_size, progress=progress,
                          steps=steps, guidance=guidance, sampler=sampler, eta=eta, thresholding=thresholding,
                          percentile=percentile, aug_level=aug_level, noise_level=noise_level)
        return result.images if return_all else result.images[-1]

    @staticmethod
    def to_pil(images):
        """uint8 [N, H, W, 3] (or one [H, W, 3]) -> a list of PIL images (one image for one array)."""
        from PIL import Image

        images = np.asarray(images)
        if images.dtype != np.uint8:
            images = cascade.to_uint8(images)
        if images.ndim == 3:
            return Image.fromarray(images)
        return [Image.fromarray(im) for im in images]


def _joined(v):
    """(64, 32) / [64, 32] -> '64,32' (the per-stage form settings_for reads)."""
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return v


def _prompts(prompts):
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise cascade.CascadeError(f"prompts must be a non-empty string or list of non-empty strings, got "
                                   f"{prompts!r}"[:200])
    return prompts


__all__ = ["Pipeline", "Result", "TRACED_SETTINGS"]
