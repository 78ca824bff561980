"""Prompt -> images through a cascade of stages: the library behind `imagen_jax.sample`, the demo and
FID evaluation (settings per stage, prompt reading, writing images atomically)."""
import json
import os
import shutil

import jax
import numpy as np

from imagen_jax import cascade, conditioning, parallel


class UsageError(ValueError):
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
        if not os.path.exists(prompts_file):
            raise UsageError(f"--prompts_file {prompts_file} does not exist")
        with open(prompts_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts or any(not p.strip() for p in prompts):
        raise UsageError("no prompts: give --prompt and/or a non-empty --prompts_file (empty prompts are refused)")
    return prompts


def settings_for(stages, *, steps=None, guidance=None, sampler=None, eta=0.0, thresholding=None,
                 percentile=99.5, aug_level=None):
    n = len(stages)
    steps = per_stage(steps, n, "steps", int, [int(s.config.sampling.steps) for s in stages])
    guidance = per_stage(guidance, n, "guidance", float, [float(s.config.sampling.guidance) for s in stages])
    samplers = per_stage(sampler, n, "sampler", str, [s.config.sampling.sampler for s in stages])
    thresh = per_stage(thresholding, n, "thresholding", str, ["dynamic"] * n)
    sr = n - 1
    augs = [0.0] + (per_stage(aug_level, sr, "aug_level", float, [0.0] * sr) if sr else [])
    if not sr and aug_level is not None:
        raise UsageError("--aug_level applies to super-resolution stages, but only a base stage was given")
    return [cascade.StageSettings(sampler=samplers[i], steps=steps[i], guidance=guidance[i], thresholding=thresh[i],
                                  percentile=percentile, eta=eta, aug_level=augs[i]) for i in range(n)]


def generate(stage_dirs, prompts, out, *, num_images=1, seed=0, batch_size=0, overwrite=False, log=print,
             **setting_flags):
    """Library form of the CLI: returns the final stage's uint8 images [N, S, S, 3]."""
    from PIL import Image

    if os.path.exists(out) and not overwrite:
        raise UsageError(f"output directory {out} exists (pass --overwrite to replace it)")
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    stages = [cascade.load_stage(d, mesh) for d in stage_dirs]
    cascade.check_chain(stages)
    settings = settings_for(stages, **setting_flags)
    samplers = [cascade.StageSampler(st, mesh, s) for st, s in zip(stages, settings)]
    cond = conditioning.build(stages[0].config, workdir=stages[0].source, mesh=None)
    log(f"text encoder: {cond.description}")
    expanded = [p for p in prompts for _ in range(num_images)]
    text, mask = cond(expanded)
    outputs, times = cascade.run_cascade(samplers, np.asarray(text), np.asarray(mask), seed,
                                         batch_size=batch_size or None, log=log)
    final = outputs[-1]
    if jax.process_index() == 0:
        partial = out.rstrip("/") + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(os.path.join(partial, "images"))
        for i, img in enumerate(final):
            Image.fromarray(img).save(os.path.join(partial, "images", f"{i // num_images:04d}_{i % num_images:02d}.png"))
        Image.fromarray(cascade.grid(final, cols=num_images if num_images > 1 else None)).save(
            os.path.join(partial, "grid.png"))
        record = {"prompts": prompts, "num_images": num_images, "seed": seed,
                  "batch_size": batch_size, "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
                  "stages": [{"source": st.source, "step": st.step, "resolution": st.image_size,
                              "seconds": round(t, 3), **s.__dict__} for st, s, t in zip(stages, settings, times)],
                  "text_encoder": cond.description, "jax": jax.__version__}
        with open(os.path.join(partial, "settings.json"), "w") as f:
            json.dump(record, f, indent=2)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(partial, out)
        log(f"wrote {len(final)} images at {final.shape[1]}x{final.shape[2]} to {out}")
    return final


