"""DeepFloyd IF in imagen_jax against diffusers on one GPU, random weights at real size (issue 12).

    python benchmarks/deepfloyd.py --wheels /path/to/wheels --out if_results.json
    python benchmarks/deepfloyd.py --batches 2,32 --dtypes bfloat16,float16 --workdir /tmp/if_bench
    JAX_PLATFORMS=cpu python benchmarks/deepfloyd.py --tiny --out /tmp/if_tiny.json   # CPU smoke test

Case "unet_step": one IF-I-XL sampling step's network work, i.e. the U-Net on the classifier-free
guidance batch (uncond + cond, so `--batches` are U-Net batches: 2 = one prompt, 32 = 16 prompts) at
64x64 with 77 text tokens, then the guidance combination of the first 3 channels. Ours: imagen_jax
`load_unet` in bf16 and fp16 (parameters and compute), jitted, cuDNN flash attention (`--attention
auto`). Peer: diffusers `UNet2DConditionModel` in fp16 with its default attention processor
(AttnAddedKVProcessor2_0: torch scaled_dot_product_attention), under torch.inference_mode.
Reported: median ms/step, peak device memory of each side, and diffusers/ours (speed-up).

Both sides read the same weights: a random diffusers checkpoint written once (by diffusers, on the GPU,
fp16 safetensors) to --workdir/IF-I-XL/unet and reused by later runs; our bf16 run converts it on load.
Both sides also run the same input at the first batch and the parent reports the relative difference
of their outputs (a check that the two sides really compute the same network).

Every side runs in its own child process (each gets the whole card; an OOM stays in its case).
diffusers need not be installed: --wheels DIR (or IF_BENCH_WHEELS) names a directory of pure-Python
wheels (diffusers and what it needs beyond torch/transformers/safetensors/huggingface_hub); they are
unzipped into DIR/site once and put on sys.path of the diffusers side.

Adding a case (e.g. the whole stage I + II run): write `jax_<case>(spec)` and `torch_<case>(spec)`
returning {"median_s", "peak_bytes", ...}, add the case to CASES with its spec list, see `pipeline_specs`.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import timing  # noqa: E402

TEXT_LEN, TEXT_DIM, GUIDANCE = 77, 4096, 7.0
TINY_UNET = dict(  # the IF block family at toy size, for --tiny
    sample_size=16, in_channels=3, out_channels=6, block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=16, cross_attention_dim=64,
    encoder_hid_dim=64, encoder_hid_dim_type="text_proj", addition_embed_type="text",
    addition_embed_type_num_heads=4, act_fn="gelu", resnet_time_scale_shift="scale_shift",
    cross_attention_norm="group_norm", norm_num_groups=32)


# --------------------------------------------------------------------------- shared inputs


def step_inputs(cfg, batch, text_dim, seed=0):
    """The same numpy inputs for both sides: x [batch, C, S, S] (NCHW), text [batch, L, D], t."""
    import numpy as np

    rng = np.random.default_rng(seed)
    s = cfg["sample_size"]
    x = rng.standard_normal((batch // 2, cfg["in_channels"], s, s), dtype=np.float32)
    x = np.concatenate([x, x])  # the guidance batch: the same image under both text conditions
    text = rng.standard_normal((batch, TEXT_LEN, text_dim), dtype=np.float32)
    return x, text, 500


def add_wheels(wheels):
    """Unzips the wheels in `wheels` into wheels/site once and puts that first on sys.path."""
    if not wheels:
        return
    site = os.path.join(wheels, "site")
    whls = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    stamp = os.path.join(site, ".unzipped")
    if whls and not os.path.exists(stamp):
        os.makedirs(site, exist_ok=True)
        for w in whls:
            with zipfile.ZipFile(w) as z:
                z.extractall(site)
        Path(stamp).write_text("\n".join(os.path.basename(w) for w in whls))
    sys.path.insert(0, site if os.path.isdir(site) else wheels)


# --------------------------------------------------------------------------- diffusers side


def _torch_device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_write_checkpoint(spec):
    """A random diffusers U-Net of spec["config"] saved as fp16 safetensors (skipped if present)."""
    import torch
    from diffusers import UNet2DConditionModel

    unet_dir = spec["unet_dir"]
    if os.path.isfile(os.path.join(unet_dir, "diffusion_pytorch_model.fp16.safetensors")):
        return {"unet_dir": unet_dir, "reused": True}
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device(_torch_device()):  # random init on the GPU: seconds, not minutes on the host
        model = UNet2DConditionModel(**spec["config"])
    model = model.half()
    model.save_pretrained(unet_dir, variant="fp16")
    n = sum(p.numel() for p in model.parameters())
    return {"unet_dir": unet_dir, "reused": False, "params": n, "write_s": time.time() - t0}


def torch_unet_step(spec):
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel, __version__

    dev = _torch_device()
    dtype = torch.float16 if dev == "cuda" else torch.float32  # CPU (--tiny): fp16 kernels are partial there
    model = UNet2DConditionModel.from_pretrained(spec["unet_dir"], variant="fp16", torch_dtype=dtype).to(dev).eval()
    processor = type(next(iter(model.attn_processors.values()))).__name__
    x, text, t = step_inputs(spec["config"], spec["batch"], spec["text_dim"])
    x, text = torch.from_numpy(x).to(dev, dtype), torch.from_numpy(text).to(dev, dtype)
    tt = torch.tensor(t, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    @torch.inference_mode()
    def step():
        out = model(x, tt, encoder_hidden_states=text).sample
        unc, cond = out.chunk(2)
        return torch.cat([unc[:, :3] + GUIDANCE * (cond[:, :3] - unc[:, :3]), cond[:, 3:]], 1)

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    r = timing.measure(step, lambda o: sync(), warmup=spec["warmup"], iters=spec["iters"], budget_s=spec["budget_s"])
    if spec.get("save_output"):
        np.save(spec["save_output"], step().float().cpu().numpy())
    r.update(peak_bytes=torch.cuda.max_memory_allocated() if dev == "cuda" else None, dtype=str(dtype),
             processor=processor, diffusers=__version__, torch=torch.__version__, device=dev)
    return r


# --------------------------------------------------------------------------- imagen_jax side


def jax_unet_step(spec):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from imagen_jax.models import deepfloyd_if

    dtype = jnp.dtype(spec["dtype"])
    t0 = time.time()
    module, params = deepfloyd_if.load_unet(spec["unet_dir"], dtype=dtype, attention_impl=spec["attention"])
    jax.block_until_ready(params)
    load_s = time.time() - t0
    x, text, t = step_inputs(spec["config"], spec["batch"], spec["text_dim"])
    x, text = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(text, dtype)
    tt = jnp.full((x.shape[0],), t, jnp.int32)

    @jax.jit
    def step(params, x, text):
        out = module.apply({"params": params}, x, tt, text)
        unc, cond = jnp.split(out, 2)
        return jnp.concatenate([unc[..., :3] + GUIDANCE * (cond[..., :3] - unc[..., :3]), cond[..., 3:]], -1)

    r = timing.measure(lambda: step(params, x, text), jax.block_until_ready, warmup=spec["warmup"],
                       iters=spec["iters"], budget_s=spec["budget_s"])
    if spec.get("save_output"):
        np.save(spec["save_output"], np.asarray(step(params, x, text), np.float32).transpose(0, 3, 1, 2))
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    from imagen_jax.models import layers
    r.update(peak_bytes=stats.get("peak_bytes_in_use"), dtype=dtype.name, load_s=load_s, device=dev.device_kind,
             attention=layers.choose_attention_impl(spec["attention"], dtype), jax=jax.__version__)
    return r


# --------------------------------------------------------------------------- cases and the runner


def unet_step_specs(args, base):
    """(label, side function, spec) for every measurement of the unet_step case."""
    jobs = []
    for i, batch in enumerate(args.batches):
        common = dict(base, batch=batch)
        save = i == 0
        jobs.append((f"diffusers batch {batch}", "torch_unet_step",
                     dict(common, save_output=os.path.join(args.workdir, "out_torch.npy") if save else None)))
        for dtype in args.dtypes:
            for att in args.attention:
                tag = f"{dtype}-{att}"
                jobs.append((f"imagen_jax {tag} batch {batch}", "jax_unet_step",
                             dict(common, dtype=dtype, attention=att,
                                  save_output=os.path.join(args.workdir, f"out_{tag}.npy") if save else None)))
    return jobs


SCHED_I = dict(beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02, clip_sample=True,
               clip_sample_range=1.0, dynamic_thresholding_ratio=0.95, num_train_timesteps=1000,
               prediction_type="epsilon", sample_max_value=1.5, thresholding=True, variance_type="learned_range")
SCHED_II = dict(SCHED_I, sample_max_value=1.0)
NOISING_II = dict(beta_schedule="squaredcos_cap_v2")  # IF-II's image_noising_scheduler (reference 1.5)


def pipeline_inputs(batch, text_dim, seed=1):
    """Prompt and negative embeddings [batch, 77, D] (the T5 is not part of this case on either side)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((batch, TEXT_LEN, text_dim), dtype=np.float32)
    neg = rng.standard_normal((1, TEXT_LEN, text_dim), dtype=np.float32)
    return emb, np.repeat(neg, batch, 0)


def torch_pipeline(spec):
    """diffusers IFPipeline (stage I) then IFSuperResolutionPipeline (stage II), fp16, from embeddings."""
    import torch
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel

    dev = _torch_device()
    dtype = torch.float16 if dev == "cuda" else torch.float32
    u1 = UNet2DConditionModel.from_pretrained(spec["unet_dir"], variant="fp16", torch_dtype=dtype).to(dev).eval()
    u2 = UNet2DConditionModel.from_pretrained(spec["unet2_dir"], variant="fp16", torch_dtype=dtype).to(dev).eval()
    none = dict(tokenizer=None, text_encoder=None, safety_checker=None, feature_extractor=None, watermarker=None,
                requires_safety_checker=False)
    p1 = IFPipeline(unet=u1, scheduler=DDPMScheduler(**SCHED_I), **none)
    p2 = IFSuperResolutionPipeline(unet=u2, scheduler=DDPMScheduler(**SCHED_II),
                                   image_noising_scheduler=DDPMScheduler(**NOISING_II), **none)
    for p in (p1, p2):
        p.set_progress_bar_config(disable=True)
    emb, neg = pipeline_inputs(spec["prompts"], spec["text_dim"])
    emb, neg = torch.from_numpy(emb).to(dev, dtype), torch.from_numpy(neg).to(dev, dtype)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def run(steps):
        g = torch.Generator(dev).manual_seed(0)
        img = p1(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=steps[0],
                 guidance_scale=spec["guidance"][0], output_type="pt", generator=g).images
        return p2(image=img, prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=steps[1],
                  guidance_scale=spec["guidance"][1], noise_level=250, output_type="pt", generator=g).images

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        run((2, 2))  # warm-up: cuDNN/cuBLAS handles, allocator
        r = timing.measure(lambda: run(spec["steps"]), lambda o: sync(), warmup=0, iters=spec["iters"],
                           budget_s=spec["budget_s"], min_iters=1)
    r.update(peak_bytes=torch.cuda.max_memory_allocated() if dev == "cuda" else None, dtype=str(dtype))
    return r


def jax_pipeline(spec):
    """imagen_jax's IF stage samplers (one jitted scan per stage), the same weights and embeddings."""
    import jax
    import jax.numpy as jnp

    from imagen_jax import deepfloyd
    from imagen_jax.diffusion import discrete
    from imagen_jax.models import deepfloyd_if

    dtype = jnp.dtype(spec["dtype"])
    stages = []
    for kind, unet_dir, sched, noising in (("I", spec["unet_dir"], SCHED_I, None),
                                           ("II", spec["unet2_dir"], SCHED_II, NOISING_II)):
        module, params = deepfloyd_if.load_unet(unet_dir, dtype=dtype, attention_impl=spec["attention"])
        stages.append(deepfloyd.IFStage(
            source=unet_dir, kind=kind, module=module, params=params,
            schedule=discrete.DiscreteSchedule.from_config(dict(sched, _class_name="DDPMScheduler")),
            noising=discrete.DiscreteSchedule.from_config(dict(noising, _class_name="DDPMScheduler")) if noising else None,
            has_text_encoder=False))
    emb, neg = pipeline_inputs(spec["prompts"], spec["text_dim"])
    emb, neg = jnp.asarray(emb, dtype), jnp.asarray(neg[:1], dtype)
    samplers = [deepfloyd.IFStageSampler(st, deepfloyd.IFSettings(steps=n, guidance=g), neg)
                for st, n, g in zip(stages, spec["steps"], spec["guidance"])]

    def run():
        rng = jax.random.PRNGKey(0)
        low = samplers[0](emb, None, None, jax.random.fold_in(rng, 0))
        return samplers[1](emb, None, low, jax.random.fold_in(rng, 1))

    t0 = time.time()
    jax.block_until_ready(run())  # compiles both stages' programs
    first_s = time.time() - t0
    r = timing.measure(run, jax.block_until_ready, warmup=0, iters=spec["iters"], budget_s=spec["budget_s"],
                       min_iters=1)
    stats = jax.devices()[0].memory_stats() or {}
    r.update(peak_bytes=stats.get("peak_bytes_in_use"), dtype=dtype.name, first_run_s=first_s)
    return r


def pipeline_specs(args, base):
    """The whole stage I (100 steps, guidance 7) + stage II (50 steps, guidance 4, noise level 250)
    run for 16 prompts (`--prompts`), both sides from the same embeddings and weights."""
    if args.tiny:
        cfg2 = dict(TINY_UNET, in_channels=6, sample_size=32, class_embed_type="timestep")
        steps = (3, 2)
    else:
        from imagen_jax.models import deepfloyd_if
        cfg2, steps = deepfloyd_if.IF_II_L, (100, 50)
    unet2_dir = os.path.join(args.workdir, "IF-II-L" if not args.tiny else "tiny2", "unet")
    common = dict(base, unet2_dir=unet2_dir, config2=cfg2, prompts=args.prompts, steps=steps,
                  guidance=(7.0, 4.0), iters=1 if not args.tiny else 1)
    jobs = [("write stage II checkpoint", "torch_write_checkpoint", dict(config=cfg2, unet_dir=unet2_dir)),
            (f"diffusers pipeline {args.prompts} prompts", "torch_pipeline", common)]
    for dtype in args.dtypes[:1]:
        jobs.append((f"imagen_jax pipeline {dtype} {args.prompts} prompts", "jax_pipeline",
                     dict(common, dtype=dtype, attention=args.attention[0])))
    return jobs


CASES = {"unet_step": unet_step_specs, "pipeline": pipeline_specs}


def run_child(fn, spec, label, wheels, timeout):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", fn, "--spec", json.dumps(spec),
           "--result", result_path] + (["--wheels", wheels] if wheels else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if fn.startswith("jax_"):
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
    else:
        env.setdefault("HF_HUB_OFFLINE", "1")
    print(f"[{label}] start", flush=True)
    try:
        subprocess.run(cmd, cwd=str(REPO), env=env, timeout=timeout)
        with open(result_path) as f:
            payload = json.load(f)
    except subprocess.TimeoutExpired:
        payload = {"error": f"timed out after {timeout:.0f}s"}
    except (OSError, ValueError):
        payload = {"error": "the child wrote no result (crashed?)"}
    if "error" in payload:
        print(f"[{label}] error: {payload['error']}", flush=True)
    return payload


def worker(fn, spec_json, result_path, wheels):
    add_wheels(wheels)
    try:
        payload = {"result": globals()[fn](json.loads(spec_json))}
    except Exception as e:  # the parent prints it and goes on with the next case
        import traceback
        traceback.print_exc()
        payload = {"error": timing.short_error(e, 600)}
    with open(result_path, "w") as f:
        json.dump(payload, f)


def summarize(results, args):
    """Markdown rows: ms/step and peak memory of each side, speed-up = diffusers / ours."""
    import numpy as np

    lines = ["| case | batch | side | ms/step | peak GiB | diffusers / ours |", "|---|---|---|---|---|---|"]
    for batch in args.batches:
        rows = [r for r in results if r["spec"].get("batch") == batch and "result" in r]
        ref = next((r["result"] for r in rows if r["fn"] == "torch_unet_step"), None)
        for r in rows:
            res = r["result"]
            ms = res["median_s"] * 1e3
            ratio = f"{ref['median_s'] / res['median_s']:.2f}x" if ref and r["fn"] != "torch_unet_step" else ""
            gib = f"{res['peak_bytes'] / 2**30:.1f}" if res.get("peak_bytes") else "n/a"
            side = r["label"].split(" batch")[0] + (f" {res['dtype']}, {res['processor']}" if "processor" in res else
                                                   f", attention {res['attention']}")
            lines.append(f"| unet_step | {batch} | {side} | {ms:.1f} | {gib} | {ratio} |")
    pipe = [r for r in results if r["fn"] in ("torch_pipeline", "jax_pipeline") and "result" in r]
    ref = next((r["result"] for r in pipe if r["fn"] == "torch_pipeline"), None)
    for r in pipe:
        res = r["result"]
        ratio = f"{ref['median_s'] / res['median_s']:.2f}x" if ref and r["fn"] == "jax_pipeline" else ""
        gib = f"{res['peak_bytes'] / 2**30:.1f}" if res.get("peak_bytes") else "n/a"
        lines.append(f"| pipeline I+II, {args.prompts} prompts (s/run) | {2 * args.prompts} | {r['label']} | "
                     f"{res['median_s']:.2f} s | {gib} | {ratio} |")
    ref_path = os.path.join(args.workdir, "out_torch.npy")
    for path in sorted(glob.glob(os.path.join(args.workdir, "out_*.npy"))):
        if path != ref_path and os.path.exists(ref_path):
            a, b = np.load(path), np.load(ref_path)
            rel = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
            lines.append(f"\n{os.path.basename(path)} vs diffusers at batch {args.batches[0]}: max |diff| / max |ref| = {rel:.3g}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="unet_step", help=f"comma list of {sorted(CASES)}")
    p.add_argument("--batches", default="2,32", help="U-Net batches (the guidance-doubled batch)")
    p.add_argument("--dtypes", default="bfloat16,float16", help="imagen_jax dtypes (params and compute)")
    p.add_argument("--attention", default="auto", help="imagen_jax attention: comma list of auto, xla, cudnn")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "if_bench"),
                   help="where the random checkpoint is written once and reused")
    p.add_argument("--wheels", default=os.environ.get("IF_BENCH_WHEELS", ""),
                   help="directory of wheels (diffusers ...) for the diffusers side")
    p.add_argument("--prompts", type=int, default=16, help="pipeline case: prompts per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--budget", type=float, default=120.0, help="timing seconds per measurement")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    p.add_argument("--tiny", action="store_true", help="toy U-Net, 2 iterations (CPU smoke test)")
    p.add_argument("--out", default="", help="JSON results (and a .md table beside it)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.spec, args.result, args.wheels)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.dtypes = args.dtypes.split(",")
    args.attention = args.attention.split(",")
    if any(b % 2 for b in args.batches):
        p.error(f"--batches are guidance-doubled U-Net batches and must be even, got {args.batches}")
    unknown = sorted(set(args.cases.split(",")) - set(CASES))
    if unknown:
        p.error(f"unknown --cases {unknown}; known: {sorted(CASES)}")
    from imagen_jax.models import deepfloyd_if
    if args.tiny:
        config, text_dim = TINY_UNET, TINY_UNET["encoder_hid_dim"]
        args.warmup, args.iters, args.workdir = 1, 2, os.path.join(args.workdir, "tiny")
    else:
        config, text_dim = deepfloyd_if.IF_I_XL, TEXT_DIM
    os.makedirs(args.workdir, exist_ok=True)
    unet_dir = os.path.join(args.workdir, "IF-I-XL" if not args.tiny else "tiny", "unet")
    for old in glob.glob(os.path.join(args.workdir, "out_*.npy")):
        os.remove(old)
    results = []
    made = run_child("torch_write_checkpoint", dict(config=config, unet_dir=unet_dir), "write random checkpoint",
                     args.wheels, args.timeout)
    results.append(dict(fn="torch_write_checkpoint", label="checkpoint", spec={}, **made))
    if "error" in made:
        sys.exit(f"error: could not write the random checkpoint: {made['error']}")
    base = dict(config=config, unet_dir=unet_dir, text_dim=text_dim, warmup=args.warmup, iters=args.iters,
                budget_s=args.budget)
    for case in args.cases.split(","):
        for label, fn, spec in CASES[case](args, base):
            results.append(dict(fn=fn, label=label, spec=spec, **run_child(fn, spec, label, args.wheels, args.timeout)))
    table = summarize(results, args)
    print(table)
    if args.out:
        for r in results:
            r["spec"] = {k: v for k, v in r["spec"].items() if k != "config"}
        Path(args.out).write_text(json.dumps(dict(results=results, tiny=args.tiny), indent=1, default=str))
        Path(os.path.splitext(args.out)[0] + ".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
