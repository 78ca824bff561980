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


def pipeline_specs(args, base):
    """Hook for the whole stage I (100 steps, guidance 7) + stage II (50 steps), 16 prompts case:
    return (label, side function, spec) jobs for `jax_pipeline` / `torch_pipeline`; none yet."""
    return []


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
