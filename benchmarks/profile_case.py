"""Profile one of the benchmark cases with jax.profiler and print where the device time goes.

    python benchmarks/profile_case.py train --stage base64 --variant paper --optimizer adam --remat off --batch 64
    python benchmarks/profile_case.py sample --stage base64 --variant small --steps 256 --batch 16
    python benchmarks/profile_case.py train ... --trace_dir /tmp/trace   # keep the trace (Perfetto/TensorBoard)

The case is built exactly as benchmarks/ours.py builds it (same config, inputs, compiled step); a
few untraced warm-up iterations, then `--iters` traced ones. The trace (an XSpace .xplane.pb) is read
back with jax.profiler.ProfileData, which needs no TensorBoard: the table is the device's "XLA Ops"
line (one event per HLO instruction run) summed per instruction, then per op category, plus the
share of the wall time the device was busy (the rest is launch gaps and host work). Prints JSON
last (one line) so a runner can keep it.
"""
import argparse
import collections
import glob
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402


def _stat(event, *names):
    for k, v in event.stats:
        if k in names:
            return v
    return None


def _category(name, kind):
    """A coarse class of an HLO instruction, from its name and XLA's own category stat."""
    n = name.lower()
    k = (kind or "").lower()
    for key, label in (("convolution", "convolution"), ("conv", "convolution"), ("cudnn", "cuDNN call"),
                       ("flash", "attention (cuDNN)"), ("gemm", "matmul"), ("dot", "matmul"),
                       ("cublas", "matmul"), ("all-reduce", "collective"), ("all-gather", "collective"),
                       ("reduce-scatter", "collective"), ("copy", "copy/transpose"),
                       ("transpose", "copy/transpose"), ("reduce", "reduction fusion"),
                       ("while", "loop"), ("fusion", "elementwise fusion")):
        if key in k or key in n:
            return label
    return k or "other"


def summarise(trace_dir, iters, wall_s, top=10):
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no .xplane.pb under {trace_dir}")
    pd = jax.profiler.ProfileData.from_file(files[-1])
    ops = collections.defaultdict(lambda: [0, 0, ""])  # name -> [ns, count, category]
    kernels = collections.defaultdict(lambda: [0, 0])
    busy_ns = 0
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU") and not plane.name.startswith("/device:TPU"):
            continue
        for line in plane.lines:
            if line.name == "XLA Ops":
                for e in line.events:
                    rec = ops[e.name]
                    rec[0] += e.duration_ns
                    rec[1] += 1
                    if not rec[2]:
                        rec[2] = _category(e.name, _stat(e, "hlo_category", "category"))
            elif line.name.startswith("Stream") or line.name.startswith("XLA TraceMe"):
                for e in line.events:
                    k = kernels[e.name]
                    k[0] += e.duration_ns
                    k[1] += 1
                    if line.name.startswith("Stream"):
                        busy_ns += e.duration_ns
    total_ops = sum(v[0] for v in ops.values()) or 1
    by_cat = collections.defaultdict(int)
    for v in ops.values():
        by_cat[v[2]] += v[0]
    top_ops = sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]
    top_kernels = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    per = 1e6 * iters  # ns -> ms per iteration
    return {
        "wall_ms_per_iter": 1e3 * wall_s / iters,
        "device_busy_ms_per_iter": busy_ns / per,
        "xla_ops_ms_per_iter": total_ops / per,
        "categories_ms_per_iter": {k: v / per for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": k, "category": v[2], "ms_per_iter": v[0] / per, "calls_per_iter": v[1] / iters,
                     "share": v[0] / total_ops} for k, v in top_ops],
        "top_kernels": [{"kernel": k[:120], "ms_per_iter": v[0] / per, "calls_per_iter": v[1] / iters}
                        for k, v in top_kernels],
    }


def _print(summary):
    print(f"wall {summary['wall_ms_per_iter']:.2f} ms/iter, device busy {summary['device_busy_ms_per_iter']:.2f}, "
          f"XLA ops {summary['xla_ops_ms_per_iter']:.2f}")
    print("by category (ms/iter):", ", ".join(f"{k} {v:.2f}" for k, v in summary["categories_ms_per_iter"].items()))
    print("| # | HLO op | category | ms/iter | calls/iter | share |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(summary["top_ops"], 1):
        print(f"| {i} | `{r['op']}` | {r['category']} | {r['ms_per_iter']:.2f} | {r['calls_per_iter']:.0f} | "
              f"{100 * r['share']:.1f}% |")
    print("top kernels:")
    for r in summary["top_kernels"]:
        print(f"  {r['ms_per_iter']:8.2f} ms  x{r['calls_per_iter']:.0f}  {r['kernel']}")


def _train_case(args):
    from benchmarks import cases
    from benchmarks.ours import _device_batch
    from imagen_jax import parallel, training

    config = cases.stage_config(args.stage, args.variant, args.text_len, optimizer=args.optimizer,
                                remat=args.remat)
    mesh = parallel.make_mesh(config.mesh)
    config.train.batch_size = args.batch
    t0 = time.perf_counter()
    trainer = training.Trainer(config, mesh)
    state = trainer.init(jax.random.PRNGKey(0))
    batch = _device_batch(trainer, args.batch, seed=1)
    rng = jax.random.PRNGKey(2)
    print(f"  built and initialised in {time.perf_counter() - t0:.1f}s", flush=True)
    compiled, compile_s, reused = training.step.executable(trainer, state, batch, rng)
    print(f"  compiled in {compile_s:.1f}s" + (" (by remat=auto's choice)" if reused else ""), flush=True)
    _write_hlo(compiled, args.hlo_out)
    holder = {"state": state}
    del state

    def step():
        holder["state"], metrics = compiled(holder["state"], batch, rng)
        return metrics

    return step, f"train {args.stage}:{args.variant} batch {args.batch} ({config.optimizer.name}, remat={config.model.remat})"


def _write_hlo(compiled, path):
    """The optimised HLO (gzip), to look up what each fusion in the top-ops table computes."""
    if path:
        import gzip

        with gzip.open(path, "wt") as f:
            f.write(compiled.as_text())
        print(f"  optimised HLO -> {path}", flush=True)


def _sample_case(args):
    import jax.numpy as jnp

    from benchmarks import cases
    from benchmarks.ours import _random_stage
    from imagen_jax import cascade, parallel

    config = cases.stage_config(args.stage, args.variant, args.text_len)
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    stage, _ = _random_stage(config, mesh)
    settings = cascade.StageSettings(sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                                     thresholding="dynamic")
    sampler = cascade.StageSampler(stage, mesh, settings)
    size, lowres_size = cases.image_sizes(config)
    host = cases.random_inputs(args.batch, size, lowres_size, config.text.max_length, config.model.text_dim, seed=3)
    text = jnp.asarray(host["text"], jnp.dtype(config.model.dtype))
    mask = jnp.asarray(host["text_mask"])
    lowres = jnp.asarray(host["lowres"]) if lowres_size else None
    rng = jax.random.PRNGKey(4)
    if args.hlo_out:
        _write_hlo(sampler.lower(text, mask, lowres, rng).compile(), args.hlo_out)
    return (lambda: sampler(text, mask, lowres, rng),
            f"sample {args.stage}:{args.variant} {args.sampler} {args.steps} steps batch {args.batch}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=["train", "sample"])
    ap.add_argument("--stage", default="base64")
    ap.add_argument("--variant", default="paper")
    ap.add_argument("--optimizer", default="config", help="train: config | adam | adafactor")
    ap.add_argument("--remat", default="config", choices=["config", "on", "off"])
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    ap.add_argument("--text_len", type=int, default=128)
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--trace_dir", default="", help="keep the trace here (default: a temporary folder)")
    ap.add_argument("--json", default="", help="also write the summary here")
    ap.add_argument("--hlo_out", default="", help="write the compiled train step's or sampler's optimised HLO here (.txt.gz)")
    args = ap.parse_args(argv)

    step, title = (_train_case if args.case == "train" else _sample_case)(args)
    print(f"profiling {title} on {jax.devices()[0].device_kind}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
          flush=True)
    for _ in range(args.warmup):
        jax.block_until_ready(step())
    t0 = time.perf_counter()
    for _ in range(args.iters):
        jax.block_until_ready(step())
    untraced = (time.perf_counter() - t0) / args.iters
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="imagen_profile_")
    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        for _ in range(args.iters):
            jax.block_until_ready(step())
        wall = time.perf_counter() - t0
    summary = summarise(trace_dir, args.iters, wall, args.top)
    summary.update(case=title, untraced_ms_per_iter=1e3 * untraced, xla_flags=os.environ.get("XLA_FLAGS", ""),
                   device=jax.devices()[0].device_kind, trace_dir=trace_dir if args.trace_dir else None)
    print(f"untraced {1e3 * untraced:.2f} ms/iter")
    _print(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps({"case": title, "untraced_ms": summary["untraced_ms_per_iter"],
                      "busy_ms": summary["device_busy_ms_per_iter"]}))


if __name__ == "__main__":
    main()
