"""Prompt -> images through a cascade of stages: the library behind `imagen_jax.sample`, the demo and
FID evaluation (settings per stage, prompt reading, writing images atomically)."""
import json
import math
import os
import shutil
import tempfile

import jax
import numpy as np
from etils import epath

from imagen_jax import cascade, cli, conditioning, paths


class UsageError(cli.UsageError):
    pass


def per_stage(value, n, name, cast, default):
    """'a,b,c' -> a list of n values (one value is broadcast); None -> the defaults."""
    if value is None:
        return list(default)
    parts = [cast(v) for v in str(value).split(",") if v.strip() != ""]
    if len(parts) == 1:
        return parts * n
    if len(parts) != n:
        raise UsageError(f"--{name} has {len(parts)} values ({value!r}) but there are {n} stages")
    return parts


def read_prompts(prompts, prompts_file):
    prompts = list(prompts)
    if prompts_file:
        if not paths.isfile(prompts_file):
            raise UsageError(f"--prompts_file {prompts_file} does not exist")
        prompts += [line.strip() for line in paths.read_text(prompts_file).splitlines() if line.strip()]
    if not prompts or any(not p.strip() for p in prompts):
        raise UsageError("no prompts: give --prompt and/or a non-empty --prompts_file (empty prompts are refused)")
    return prompts


def _is_if(stage):
    return getattr(stage, "family", "imagen") == "deepfloyd_if"


def _sampling_defaults(stage):
    """The settings a stage samples with unless a flag overrides them: its config's `sampling`
    block (steps, guidance, sampler, thresholding, percentile, aug_level), or diffusers' for IF.
    Configs written before a field existed get that field's former fixed default."""
    if _is_if(stage):
        from imagen_jax import deepfloyd
        d = deepfloyd.default_settings(stage)
        return dict(steps=d.steps, guidance=d.guidance, sampler=d.sampler, thresholding="dynamic",
                    percentile=99.5, aug_level=0.0)
    s = stage.config.sampling
    return dict(steps=int(s.steps), guidance=float(s.guidance), sampler=s.sampler,
                thresholding=str(s.get("thresholding", "dynamic")), percentile=float(s.get("percentile", 99.5)),
                aug_level=float(s.get("aug_level", 0.0)))


def settings_for(stages, *, steps=None, guidance=None, sampler=None, eta=0.0, thresholding=None,
                 percentile=None, aug_level=None, noise_level=None):
    """One settings object per stage: each stage's config defaults (see _sampling_defaults), overridden
    by the flags given (None: not given; one value is every stage's, 'a,b,c' one per stage)."""
    n = len(stages)
    defaults = [_sampling_defaults(s) for s in stages]
    steps = per_stage(steps, n, "steps", int, [d["steps"] for d in defaults])
    guidance = per_stage(guidance, n, "guidance", float, [d["guidance"] for d in defaults])
    samplers = per_stage(sampler, n, "sampler", str, [d["sampler"] for d in defaults])
    thresh = per_stage(thresholding, n, "thresholding", str, [d["thresholding"] for d in defaults])
    percentiles = per_stage(percentile, n, "percentile", float, [d["percentile"] for d in defaults])
    sr = n - 1
    augs = [0.0] + (per_stage(aug_level, sr, "aug_level", float, [d["aug_level"] for d in defaults[1:]])
                    if sr else [])
    if not sr and aug_level is not None:
        raise UsageError("--aug_level applies to super-resolution stages, but only a base stage was given")
    if_sr = [i for i, s in enumerate(stages) if _is_if(s) and s.is_sr]
    levels = dict(zip(if_sr, per_stage(noise_level, len(if_sr), "noise_level", int, [250] * len(if_sr)))) \
        if if_sr else {}
    if noise_level is not None and not if_sr:
        raise UsageError("--noise_level applies to DeepFloyd IF stage II, but none was given")
    out = []
    for i, st in enumerate(stages):
        if _is_if(st):  # IF's discrete DDPM: thresholding is its scheduler config's, not a flag
            from imagen_jax import deepfloyd
            out.append(deepfloyd.IFSettings(sampler=samplers[i], steps=steps[i], guidance=guidance[i], eta=eta,
                                            noise_level=levels.get(i, 250)))
        else:
            out.append(cascade.StageSettings(sampler=samplers[i], steps=steps[i], guidance=guidance[i],
                                             thresholding=thresh[i], percentile=percentiles[i], eta=eta,
                                             aug_level=augs[i]))
    return out


# settings.json of a sample output carries it: --overwrite replaces only directories that hold it.
SAMPLE_MARKER = "imagen_jax.sample"
MAX_IMAGES = 1_000_000


def is_sample_output(out) -> bool:
    """A directory written by `generate` (settings.json with the marker, or with the keys that
    earlier versions wrote) and nothing that makes it a workdir or a bundle."""
    d = epath.Path(out)
    if not d.is_dir() or any((d / n).exists() for n in ("config.json", "info.json", "checkpoints")):
        return False
    try:
        record = json.loads((d / "settings.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict):
        return False
    return record.get("written_by") == SAMPLE_MARKER or {"prompts", "stages", "text_encoder"} <= set(record)


def check_replaceable(out):
    d = epath.Path(out)
    if d.is_dir() and not any(d.iterdir()):
        return
    if not is_sample_output(out):
        raise UsageError(f"--out {out} exists and is not a previous sample output (no settings.json written "
                         "by imagen_jax.sample); refusing to replace it: give a new --out")


def check_dtype(dtype):
    if dtype is not None and dtype not in cascade.DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(cascade.DTYPES)}")


def check_request(stage_dirs, prompts, out, *, num_images, overwrite, **setting_flags):
    """Everything about a request that can be refused before a model is loaded."""
    if not stage_dirs:
        raise UsageError("--stages is empty: give the stage directories, base first")
    if not 1 <= num_images or len(prompts) * num_images > MAX_IMAGES:
        raise UsageError(f"--num_images must be >= 1 and at most {MAX_IMAGES} images in all "
                         f"({len(prompts)} prompts), got {num_images}")
    for name in ("guidance", "aug_level", "steps"):
        value = setting_flags.get(name)
        for v in ([] if value is None else str(value).split(",")):
            try:
                ok = math.isfinite(float(v))
            except ValueError:
                ok = False
            if not ok:
                raise UsageError(f"--{name} {value!r}: {v.strip()!r} is not a finite number")
    for name in ("eta", "percentile"):
        v = setting_flags.get(name)
        if v is not None and not math.isfinite(float(v)):
            raise UsageError(f"--{name} must be a finite number, got {v}")
    out_s = os.fspath(out)
    cli.check_output(out_s, "--out")
    for d in stage_dirs:
        if cli.overlaps(out_s, d):
            raise UsageError(f"--out {out_s} overlaps the stage directory {d}; give another output path")
    if paths.is_remote(out_s):
        paths.check_bucket(out_s)
    if paths.exists(out_s) if paths.is_remote(out_s) else os.path.lexists(out_s):
        if not overwrite:
            raise UsageError(f"output directory {out_s} exists (pass --overwrite to replace it)")
        check_replaceable(out_s)


def check_memory(stages, n):
    """Refuses a run whose host-side arrays (every stage's uint8 images and the text embeddings, all
    kept until the end) would not fit in the memory available now."""
    per_image = sum(3 * st.image_size ** 2 for st in stages)
    for st in stages:
        if _is_if(st):
            per_image += 4 * 77 * st.text_dim
        elif st is stages[0]:
            text = st.config.get("text", {})
            per_image += 4 * int(text.get("max_length", 128)) * int(st.config.model.get("text_dim", 4096))
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if n * per_image > avail // 2:
        raise UsageError(f"{n} images need about {n * per_image / 2**30:.1f} GiB of host memory, more than half of "
                         f"the {avail / 2**30:.1f} GiB available; ask for at most {max(1, avail // 2 // per_image)}")


class StageConditioner:
    """Prompts -> one (embeddings, mask) per stage, each by its family's convention (Imagen: the
    first Imagen stage's conditioning; IF: its T5 with HF semantics, 77 tokens). Encoders are
    loaded once; `negative` is IF's unconditional embedding T5("") [1, 77, D] (None without IF).
    `t5` (a --t5 flag) encodes the prompts an Imagen stage's embedding store lacks."""

    def __init__(self, stages, t5=None):
        self.stages = list(stages)
        imagen = [s for s in stages if not _is_if(s)]
        ifs = [s for s in stages if _is_if(s)]
        desc, self.negative, self._cond, self._enc = [], None, None, None
        if imagen:
            self._cond = conditioning.build(imagen[0].config, workdir=imagen[0].source, mesh=None, t5=t5)
            desc.append(self._cond.description)
        if ifs:
            from imagen_jax import deepfloyd
            from imagen_jax.text import hf_t5
            self._enc = deepfloyd.load_text_encoder(ifs, dtype=jax.tree_util.tree_leaves(ifs[0].params)[0].dtype)
            self.negative = hf_t5.encode_with_negative(self._enc, [""])[1][:1]
            desc.append("DeepFloyd IF T5 (HF semantics, 77 tokens) from "
                        + next(s.source for s in ifs if s.has_text_encoder))
        self.description = "; ".join(desc)

    def __call__(self, prompts):
        texts, masks = [None] * len(self.stages), [None] * len(self.stages)
        if self._cond is not None:
            t, m = self._cond(prompts)
            for i, s in enumerate(self.stages):
                if not _is_if(s):
                    texts[i], masks[i] = np.asarray(t), np.asarray(m)
        if self._enc is not None:
            from imagen_jax.text import hf_t5
            emb, _ = hf_t5.encode_with_negative(self._enc, prompts)
            for i, s in enumerate(self.stages):
                if _is_if(s):
                    texts[i], masks[i] = emb, np.ones(emb.shape[:2], bool)
        return texts, masks


def generate(stage_dirs, prompts, out, *, num_images=1, seed=0, batch_size=0, overwrite=False, log=print,
             accept_license=False, dtype=None, t5=None, pipeline=None, **setting_flags):
    """Library form of the CLI: returns the final stage's uint8 images [N, S, S, 3]. `dtype`
    (None | float32 | bfloat16 | float16): see cascade.load_stage. `t5`: the T5 (checkpoint path) that encodes
    prompts missing from a stage's embedding store (default: the stage config's text.t5_checkpoint).
    `pipeline`: an imagen_jax.Pipeline already loaded (its stages, encoders and compiled samplers are
    reused; stage_dirs may then be None), instead of loading stage_dirs."""
    from PIL import Image

    from imagen_jax.pipeline import Pipeline

    if batch_size < 0:
        raise UsageError(f"--batch_size must be >= 0 (0: up to 64), got {batch_size}")
    check_dtype(dtype)
    if pipeline is not None and not stage_dirs:
        stage_dirs = [st.source for st in pipeline.stages]
    check_request(stage_dirs, prompts, out, num_images=num_images, overwrite=overwrite, **setting_flags)
    pipe = pipeline or Pipeline.load(stage_dirs, accept_license=accept_license, dtype=dtype, t5=t5)
    stages = pipe.stages
    pipe.settings(**setting_flags)  # bad settings are refused before the text encoder loads
    check_memory(stages, len(prompts) * num_images)
    text_desc = pipe.description
    log(f"text encoder: {text_desc}")
    result = pipe.run(prompts, num_images=num_images, seed=seed, batch_size=batch_size or None, progress=True,
                      log=log, **setting_flags)
    final, settings, times = result.images[-1], result.settings, result.seconds
    if jax.process_index() == 0:
        remote = paths.is_remote(out)
        # gs:// output is assembled locally and uploaded with settings.json (the marker) last.
        partial = (tempfile.mkdtemp(prefix="imagen_jax_sample_") if remote else out.rstrip("/") + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(os.path.join(partial, "images"))
        for i, img in enumerate(final):
            Image.fromarray(img).save(os.path.join(partial, "images", f"{i // num_images:04d}_{i % num_images:02d}.png"))
        Image.fromarray(cascade.grid(final, cols=num_images if num_images > 1 else None)).save(
            os.path.join(partial, "grid.png"))
        record = {"written_by": SAMPLE_MARKER, "prompts": prompts, "num_images": num_images, "seed": seed,
                  "batch_size": batch_size, "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
                  "stages": [{"source": st.source, "step": st.step, "resolution": st.image_size,
                              "dtype": cascade.stage_dtype(st), "seconds": round(t, 3), **s.__dict__}
                             for st, s, t in zip(stages, settings, times)],
                  "text_encoder": text_desc, "jax": jax.__version__}
        if any(_is_if(st) for st in stages):
            from imagen_jax import deepfloyd
            record["license"] = deepfloyd.ATTRIBUTION  # the DeepFloyd IF licence's attribution (its section 3)
            log(deepfloyd.ATTRIBUTION)
        with open(os.path.join(partial, "settings.json"), "w") as f:
            json.dump(record, f, indent=2)
        if remote:
            if paths.exists(out):
                check_replaceable(out)
                paths.rmtree(out)
            paths.upload_tree(partial, out, last=("settings.json",))
            shutil.rmtree(partial, ignore_errors=True)
        else:
            if os.path.lexists(out):
                check_replaceable(out)  # again: the directory may have changed while sampling
                shutil.rmtree(out)
            os.replace(partial, out)
        log(f"wrote {len(final)} images at {final.shape[1]}x{final.shape[2]} to {out}")
    return final


