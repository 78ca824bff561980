"""imagen_jax against its PyTorch peers on the same GPU (issue #9).

    python benchmarks/run.py --rows all --out results.json            # every row
    python benchmarks/run.py --rows 1,3,5 --out results.json --deadline 560
    JAX_PLATFORMS=cpu python benchmarks/run.py --rows all --quick --out /tmp/bench.json   # CPU smoke run
    python benchmarks/run.py --merge a.json b.json --out results.json  # combine runs, rewrite the table

Rows (see benchmarks/README.md): 1 base-64 training step, 2 SR-256 training step, 3 base-stage
sampling, 4 SR-stage sampling, 5 T5-XXL encoder, 6 weak scaling over local GPUs, 7 FID Inception.

Every side of every case runs in its own child process (this file with --worker), one after the
other on the same GPU: each gets the whole card, an out-of-memory error or a hang cannot take the
other side or the next row with it, and each is killed when its row's time budget runs out. Results
go to --out (JSON, rewritten after every row, rows of an existing file kept unless re-run) and a
markdown table beside it (same name, .md).
"""
import argparse
import collections
import datetime
import importlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ROWS = {
    1: "Training step, base 64x64 U-Net",
    2: "Training step, SR 64->256 Efficient U-Net",
    3: "Sampling, base 64x64 stage (guidance 5, dynamic thresholding)",
    4: "Sampling, SR 64->256 stage (guidance 5, dynamic thresholding)",
    5: "T5-XXL encoder forward (random weights, bf16)",
    6: "Weak scaling of the training step over local GPUs",
    7: "FID Inception pool3 features",
}
T5_XXL = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128)
T5_TINY = dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=512)


def settings(quick):
    """Sizes of every case; --quick shrinks them to seconds on a CPU (a smoke test of the code)."""
    if quick:
        return dict(text_len=16, warmup=1, iters=2, train_variants=["tiny"],
                    batches={"tiny": [4, 2]}, sample_variants=["tiny"], sample_batch=2,
                    ddpm_steps=4, ddim_steps=2, sr_steps=3, guidance=5.0,
                    t5_dims=T5_TINY, t5_batch=2, t5_len=16,
                    fid_n=4, fid_size=64, fid_batch=2, scale_variants=["tiny"], scale_batch={"tiny": [2]},
                    matmul_n=256, pipelined=2)
    return dict(text_len=128, warmup=2, iters=10, train_variants=["paper", "small"],
                batches={"paper": [64, 32, 16, 8], "small": [128, 64, 32]},
                sample_variants=["small"], sample_batch=16, ddpm_steps=256, ddim_steps=50, sr_steps=128,
                guidance=5.0, t5_dims=T5_XXL, t5_batch=64, t5_len=128,
                fid_n=1000, fid_size=256, fid_batch=200, scale_variants=["small"],
                scale_batch={"small": [64], "paper": [16, 8]}, matmul_n=8192, pipelined=5)


# --------------------------------------------------------------------------- child processes


def worker_main(fn, spec_json, result_path):
    """Runs benchmarks.<side>.<job>(spec) and writes {"result": ...} or {"error": ...}."""
    side, name = fn.split(".")
    try:
        mod = importlib.import_module(f"benchmarks.{side}")
        payload = {"result": getattr(mod, name)(json.loads(spec_json))}
    except Exception as e:  # reported to the parent, which prints it and goes on
        traceback.print_exc()
        from benchmarks.timing import short_error
        payload = {"error": short_error(e, 600)}
    with open(result_path, "w") as f:
        json.dump(payload, f, default=_json_default)
    sys.stdout.flush()
    return 0


def _json_default(x):
    try:
        return float(x)
    except Exception:
        return str(x)


class Runner:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="imagen_bench_")
        self.deadline = time.time() + args.deadline if args.deadline else math.inf
        self.count = 0

    def side_env(self, side):
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        if side == "ours":
            env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")  # whole card for this process
            if not self.args.no_compile_cache:
                env.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/imagen_jax_bench_xla_cache")
        else:
            env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
            env.setdefault("HF_HUB_OFFLINE", "1")
            env.setdefault("TRANSFORMERS_OFFLINE", "1")
            env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def job(self, side, fn, spec, *, label, until, env=None):
        """Runs one job in a child process until the time `until` (and the global deadline).
        Returns its result dict, or {"error": ...}."""
        timeout = min(until, self.deadline) - time.time()
        if timeout < 10:
            msg = "skipped: the row's time budget is spent"
            print(f"  [{label}] {msg}", flush=True)
            return {"error": msg}
        self.count += 1
        result_path = os.path.join(self.tmp, f"job{self.count}.json")
        spec = dict(spec, budget_s=timeout)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{side}.{fn}",
               "--spec", json.dumps(spec), "--result", result_path]
        full_env = self.side_env(side)
        full_env.update(env or {})
        print(f"  [{label}] start (limit {timeout:.0f}s)", flush=True)
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                cwd=str(REPO), env=full_env, preexec_fn=_die_with_parent)
        tail = collections.deque(maxlen=15)

        def pump():
            for line in proc.stdout:
                line = line.rstrip()
                tail.append(line)
                if self.args.verbose or not _noise(line):
                    print(f"  [{label}] {line}", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()  # this job's child process, by its pid
            proc.wait()
        reader.join(timeout=5)
        elapsed = time.time() - t0
        if os.path.exists(result_path):
            with open(result_path) as f:
                payload = json.load(f)
        elif timed_out:
            payload = {"error": f"timed out after {elapsed:.0f}s (row budget); last output: "
                                + " | ".join(list(tail)[-3:])}
        else:
            payload = {"error": f"exit code {proc.returncode}; last output: " + " | ".join(list(tail)[-3:])}
        status = "ok" if "result" in payload else "FAILED: " + payload["error"]
        print(f"  [{label}] {status} ({elapsed:.0f}s)", flush=True)
        out = payload.get("result", {"error": payload.get("error")})
        out["wall_s"] = elapsed
        return out


def _die_with_parent():
    """In the child: be killed when this runner dies (killed at a command's time limit, say), so
    no orphaned benchmark keeps the GPU busy for whatever runs next. Linux only."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _noise(line):
    """Log lines of the frameworks that say nothing about the benchmark."""
    return any(s in line for s in ("TF-TRT Warning", "cuda_dnn.cc", "computation_placer", "absl::InitializeLog",
                                   "WARNING: All log messages before", "E0000 00:00", "W0000 00:00",
                                   "I0000 00:00", "FutureWarning: `torch.jit.script`",
                                   "  warnings.warn("))


# --------------------------------------------------------------------------- rows


def ok(r):
    return isinstance(r, dict) and "error" not in r


def entry(case, unit, ours, ref, ref_name, *, ratio_name="ours/peer", notes=(), ratio=None, details=None,
          key=None):
    key = key or unit.replace("/", "_per_")  # the result field holding the value
    ov = ours.get(key) if ok(ours) else None
    rv = ref.get(key) if ok(ref) else None
    if ratio is None and ov and rv:
        ratio = ov / rv
    notes = list(notes)
    for side, r in (("ours", ours), (ref_name, ref)):
        if not ok(r):
            notes.append(f"{side}: {r.get('error') if isinstance(r, dict) else r}")
    return {"case": case, "unit": unit, "ours": ov, "ref": rv, "ref_name": ref_name, "ratio": ratio,
            "ratio_name": ratio_name, "notes": notes, "details": details or {"ours": ours, "ref": ref}}


class Plan:
    """A row's time budget shared by its jobs: each job may use what is left, minus a reserve for
    every job still to come, so one slow case cannot starve the rest."""

    def __init__(self, budget, njobs):
        self.end = time.time() + budget
        self.left = njobs
        self.reserve = min(90.0, budget / (2.0 * max(njobs, 1)))

    def next(self):
        self.left -= 1
        return self.end - self.reserve * max(self.left, 0)


class _PerCase:
    """A fresh budget for every job (row 6)."""

    def __init__(self, budget):
        self.budget = budget

    def next(self):
        return time.time() + self.budget


def row_train(run, s, stage, row):
    variants = run.args.variants or s["train_variants"]
    optimizers = [x for x in run.args.optimizers.split(",") if x] or ["config"]
    plan = Plan(run.args.budget, 2 * len(variants) * len(optimizers))
    out = []
    for v in variants:
        for opt in optimizers:
            batches = run.args.batches or s["batches"].get(v, [8])
            common = dict(stage=stage, variant=v, text_len=s["text_len"], warmup=s["warmup"], iters=s["iters"],
                          optimizer=opt, remat=run.args.remat, pipelined=s["pipelined"])
            label = f"{stage}:{v}" + ("" if opt == "config" else f" {opt}")
            o = run.job("ours", "train", dict(common, batches=batches, peak_flops=run.peak),
                        label=f"row{row} ours {label}", until=plan.next())
            pb = [o["batch"]] + [b for b in batches if b < o["batch"]] if ok(o) else batches
            p = run.job("peer", "train", dict(common, batches=pb), label=f"row{row} peer {label}",
                        until=plan.next())
            # Both sides' settings, so a reader can see the comparison is like for like.
            notes = []
            if ok(o):
                notes.append(f"ours: batch {o['batch']}, {fmt(o['params'] / 1e6)}M params, "
                             f"{o.get('settings', '')}")
                if o.get("mfu") is not None:
                    notes.append(f"MFU {100 * o['mfu']:.1f}%")
            if ok(p):
                notes.append(f"peer: batch {p['batch']}, {fmt(p['params'] / 1e6)}M params, "
                             f"{p.get('settings', '')}")
            out.append(entry(f"{stage} {label}", "images/s", o, p, "imagen-pytorch", notes=notes))
            # The same steps as a training loop runs them: no sync between steps on either side.
            piped = entry(f"{stage} {label}, {s['pipelined']} steps a sync", "images/s", o, p, "imagen-pytorch",
                          key="images_per_s_pipelined", details={"same jobs as": f"{stage} {label}"})
            if ok(o) and o.get("mfu_pipelined") is not None:
                piped["notes"].append(f"MFU {100 * o['mfu_pipelined']:.1f}%")
            out.append(piped)
    return out


def row_sample(run, s, stage, row):
    variants = run.args.variants or s["sample_variants"]
    if stage == "base64":
        samplers = [("ddpm", s["ddpm_steps"]), ("ddim", s["ddim_steps"])]
    else:
        samplers = [("ddpm", s["sr_steps"])]
    chosen = [x for x in run.args.samplers.split(",") if x]
    samplers = [x for x in samplers if not chosen or x[0] in chosen]
    plan = Plan(run.args.budget, 2 * len(variants) * len(samplers))
    out = []
    for v in variants:
        for sampler, steps in samplers:
            spec = dict(stage=stage, variant=v, text_len=s["text_len"], batch=s["sample_batch"], sampler=sampler,
                        steps=steps, guidance=s["guidance"], iters=max(2, s["iters"] // 3))
            o = run.job("ours", "sample", spec, label=f"row{row} ours {stage}:{v} {sampler}{steps}", until=plan.next())
            p = run.job("peer", "sample", spec, label=f"row{row} peer {stage}:{v} {sampler}{steps}", until=plan.next())
            notes = [f"batch {s['sample_batch']}"]
            if sampler == "ddim":
                notes.append("peer has no DDIM: ElucidatedImagen (Karras/Heun, ~2 evals a step), "
                             "same step count")
            for name, r in (("ours", o), ("peer", p)):
                if ok(r):
                    notes.append(f"{name} {r['network_evals']} U-Net calls")
            out.append(entry(f"{stage} {v} {sampler} {steps} steps", "images/s", o, p, "imagen-pytorch", notes=notes))
    return out


def row_t5(run, s):
    plan = Plan(run.args.budget, 2)
    spec = dict(dims=s["t5_dims"], batch=s["t5_batch"], length=s["t5_len"], iters=s["iters"])
    o = run.job("ours", "t5", spec, label="row5 ours T5", until=plan.next())
    p = run.job("peer", "t5", spec, label="row5 peer T5", until=plan.next())
    notes = [f"batch {s['t5_batch']} x {s['t5_len']} tokens"]
    if ok(o):
        notes.append(f"{fmt(o['params'] / 1e9)}B params")
    if ok(p):
        notes.append(f"HF attention: {p.get('attn_implementation')}, param dtypes {p.get('param_dtypes')}")
    return [entry("T5 encoder " + ("xxl" if s["t5_dims"] == T5_XXL else "tiny"), "tokens/s", o, p,
                  "HF transformers", notes=notes)]


def row_scaling(run, s):
    n = int(run.info.get("device_count", 1)) if ok(run.info) else 1
    env_n, env_1 = {}, {}
    cpu = ok(run.info) and run.info.get("backend") == "cpu"
    if cpu and run.args.quick:
        # CPU smoke test: two virtual host devices exercise the multi-device code paths.
        n = 2
        env_n = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        env_1 = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    elif not cpu:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        env_1 = {"CUDA_VISIBLE_DEVICES": visible.split(",")[0] if visible else "0"}
    if n < 2:
        return [{"case": "weak scaling", "unit": "images/s", "ours": None, "ref": None, "ref_name": "ours, 1 GPU",
                 "ratio": None, "ratio_name": "efficiency", "notes": [f"skipped: only {n} GPU on this machine"],
                 "details": {}}]
    variants = run.args.variants or s["scale_variants"]
    # Each case gets its own --budget (compile included): a slow 1-GPU compile cannot starve the
    # multi-GPU cases after it, as it did when the three shared one row budget. The persistent
    # compilation cache (on unless --no-compile-cache) is shared between the cases.
    plan = _PerCase(run.args.budget)
    out = []
    for v in variants:
        batches = s["scale_batch"].get(v, [8])
        common = dict(stage="base64", variant=v, text_len=s["text_len"], warmup=s["warmup"], iters=s["iters"],
                      peak_flops=run.peak)
        one = run.job("ours", "train", dict(common, batches=batches, mesh={"data": -1, "fsdp": 1, "tensor": 1}),
                      label=f"row6 1 GPU {v}", until=plan.next(), env=env_1)
        per_dev = [one["per_device_batch"]] if ok(one) else batches
        for kind, mesh in (("data parallel", {"data": -1, "fsdp": 1, "tensor": 1}),
                           ("FSDP", {"data": 1, "fsdp": -1, "tensor": 1})):
            r = run.job("ours", "train", dict(common, batches=per_dev, mesh=mesh),
                        label=f"row6 {n} GPUs {kind} {v}", until=plan.next(), env=env_n)
            eff = None
            notes = [f"per-GPU batch {per_dev[0]}"]
            if ok(r) and ok(one):
                speedup = r["images_per_s"] / one["images_per_s"]
                eff = speedup / n
                notes.append(f"speed-up {speedup:.2f}x on {n}")
            out.append(entry(f"base64 {v} {kind}, {n} GPUs", "images/s", r, one, "ours, 1 GPU",
                             ratio_name="efficiency", ratio=eff, notes=notes))
    return out


def row_fid(run, s):
    plan = Plan(run.args.budget, 2)
    weights = os.path.join(run.tmp, "fid_random_weights.npz")
    spec = dict(n_images=s["fid_n"], size=s["fid_size"], batch_size=s["fid_batch"], iters=max(2, s["iters"] // 2),
                weights_npz=weights)
    # The peer first: it builds pytorch-fid's network with random weights and saves them for ours.
    p = run.job("peer", "fid", dict(spec, feats_out=os.path.join(run.tmp, "fid_peer.npy")),
                label="row7 peer pytorch-fid", until=plan.next())
    o = run.job("ours", "fid", dict(spec, feats_out=os.path.join(run.tmp, "fid_ours.npy")),
                label="row7 ours inception", until=plan.next())
    notes = [f"{s['fid_n']} images {s['fid_size']}px, batch {s['fid_batch']}"]
    try:
        import numpy as np
        a, b = np.load(os.path.join(run.tmp, "fid_ours.npy")), np.load(os.path.join(run.tmp, "fid_peer.npy"))
        notes.append(f"same weights, float32 features max rel. diff {np.abs(a - b).max() / np.abs(b).max():.1e}")
    except Exception:
        pass
    out = []
    extras = {"float32": ["ours Precision.HIGHEST (no TF32), peer cuDNN TF32 (its default)"],
              "float32_tf32": ["both float32 with TF32 convolutions: ours precision='default', peer its default"],
              "bfloat16": ["peer stays float32 (cuDNN TF32 allowed, its default)"]}
    for name, extra in extras.items():
        ours = dict(o[name], wall_s=o.get("wall_s")) if ok(o) and name in o else o
        out.append(entry(f"inception ours {name} vs pytorch-fid", "images/s", ours, p, "pytorch-fid",
                         notes=notes + extra))
    return out


# --------------------------------------------------------------------------- output


def fmt(x):
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def table_rows(results):
    lines = []
    for key in sorted(results["rows"], key=int):
        row = results["rows"][key]
        for e in row["entries"]:
            ratio = "-" if e["ratio"] is None else f"{e['ratio']:.2f}"
            lines.append((key, e["case"], e["unit"], fmt(e["ours"]), f"{fmt(e['ref'])} ({e['ref_name']})",
                          f"{ratio} {e['ratio_name']}", "; ".join(e["notes"])))
    return lines


def print_table(results):
    lines = table_rows(results)
    head = ("row", "case", "unit", "ours", "reference", "ratio")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *[ln[:6] for ln in lines])] if lines else []
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(head, widths)), flush=True)
    for ln in lines:
        print("  ".join(str(x).ljust(w) for x, w in zip(ln[:6], widths)), flush=True)
        if ln[6]:
            print("      " + ln[6][:400], flush=True)


def markdown(results):
    m = results.get("meta", {})
    out = ["# imagen_jax vs PyTorch peers", ""]
    for run in m.get("runs", []):
        info, pinfo = run.get("ours_info") or {}, run.get("peer_info") or {}
        peak = info.get("peak_flops")
        out.append(f"- {run.get('date', '?')}: rows {run.get('rows')}{' (quick)' if run.get('quick') else ''} on "
                   f"{info.get('device_count', '?')} x {info.get('device_kind', '?')}; "
                   f"jax {info.get('jax_version', '?')}, "
                   f"torch {pinfo.get('torch_version', '?')}, imagen-pytorch {pinfo.get('imagen_pytorch', '?')}, "
                   f"transformers {pinfo.get('transformers', '?')}; measured {info.get('matmul_n', '?')}^3 "
                   f"{info.get('matmul_dtype', '?')} matmul peak {fmt(peak / 1e12) if peak else '?'} TFLOP/s (jax), "
                   f"bf16 {fmt(pinfo.get('matmul_tflops_bf16'))} (torch)")
    out += ["", "Medians of timed iterations after warm-up; each side in its own process on the same GPU. "
            "Ratio: ours / reference (higher is better for us), or weak-scaling efficiency for row 6.", "",
            "| row | case | unit | ours | reference | ratio | notes |", "|---|---|---|---|---|---|---|"]
    for ln in table_rows(results):
        out.append("| " + " | ".join(str(x).replace("|", "/") for x in ln) + " |")
    out.append("")
    for key in sorted(results["rows"], key=int):
        out.append(f"- row {key}: {results['rows'][key]['title']}")
    return "\n".join(out) + "\n"


def write(results, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=_json_default))
    tmp.replace(path)
    path.with_suffix(".md").write_text(markdown(results))


def load(path):
    try:
        with open(path) as f:
            r = json.load(f)
        if isinstance(r, dict) and "rows" in r:
            r.setdefault("meta", {}).setdefault("runs", [])
            return r
    except (OSError, ValueError):
        pass
    return {"meta": {"runs": []}, "rows": {}}


def parse_rows(text):
    if text == "all":
        return sorted(ROWS)
    rows = sorted({int(x) for x in text.split(",") if x.strip()})
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise SystemExit(f"--rows: unknown rows {bad}; known: {sorted(ROWS)} or 'all'")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="all", help="'all' or a comma list of row numbers, e.g. 1,3,5")
    ap.add_argument("--out", default="benchmarks/results.json", help="JSON results; the markdown goes beside it (.md)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 iterations: a smoke test (CPU is fine)")
    ap.add_argument("--budget", type=float, default=None, help="seconds per row (default 480, quick 300)")
    ap.add_argument("--deadline", type=float, default=0,
                    help="seconds for the whole run (0: none); what is left then is skipped")
    ap.add_argument("--variants", default="", help="config variants for rows 1-4 and 6, e.g. small or paper,small")
    ap.add_argument("--batches", default="", help="per-device batches to try for rows 1-2, e.g. 64,32,16")
    ap.add_argument("--optimizers", default="config",
                    help="rows 1-2: comma list of config | adam | adafactor, each a case run on both sides")
    ap.add_argument("--remat", default="config", choices=["config", "on", "off"],
                    help="rows 1-2: rematerialisation on both sides' config (the peer has none; it is ours only)")
    ap.add_argument("--samplers", default="", help="rows 3-4: comma list of ddpm | ddim (default: both for row 3)")
    ap.add_argument("--no-compile-cache", action="store_true", help="no persistent XLA compilation cache")
    ap.add_argument("--iters", type=int, default=0, help="timed iterations per case (default 10; sampling rows a third)")
    ap.add_argument("--fresh", action="store_true", help="do not keep the rows of an existing --out file")
    ap.add_argument("--verbose", action="store_true", help="also print the frameworks' log noise")
    ap.add_argument("--merge", nargs="+", default=None, help="only merge these result files into --out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.spec, args.result)

    if args.merge:
        results = {"meta": {"runs": []}, "rows": {}}
        for p in args.merge:
            r = load(p)
            results["meta"]["runs"] += r["meta"]["runs"]
            results["rows"].update(r["rows"])
        write(results, args.out)
        print_table(results)
        print(f"\nmerged {len(args.merge)} files into {args.out} and {Path(args.out).with_suffix('.md')}")
        return 0

    rows = parse_rows(args.rows)
    args.budget = args.budget or (300.0 if args.quick else 480.0)
    args.variants = [v for v in args.variants.split(",") if v] or None
    args.batches = [int(b) for b in args.batches.split(",") if b] or None
    s = settings(args.quick)
    if args.iters:
        s["iters"] = args.iters
    run = Runner(args)
    results = {"meta": {"runs": []}, "rows": {}} if args.fresh else load(args.out)
    started = time.time()
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "rows": rows, "quick": args.quick,
            "python": platform.python_version(), "host": platform.node(), "settings": s}
    results["meta"]["runs"].append(meta)
    print(f"benchmarks: rows {rows}{' (quick)' if args.quick else ''}, {args.budget:.0f}s per row; "
          f"results to {args.out}", flush=True)

    # Device facts and the matmul peak first (MFU of rows 1, 2 and 6 is taken against it).
    end = time.time() + min(120.0, args.budget)
    run.info = run.job("ours", "info", {"matmul_n": s["matmul_n"]}, label="device (jax)", until=end)
    run.peak = run.info.get("peak_flops") if ok(run.info) else None
    meta["ours_info"] = run.info
    if any(r != 6 for r in rows):
        meta["peer_info"] = run.job("peer", "info", {"matmul_n": s["matmul_n"]}, label="device (torch)",
                                    until=time.time() + 120.0)
    write(results, args.out)

    builders = {1: lambda: row_train(run, s, "base64", 1), 2: lambda: row_train(run, s, "sr256", 2),
                3: lambda: row_sample(run, s, "base64", 3), 4: lambda: row_sample(run, s, "sr256", 4),
                5: lambda: row_t5(run, s), 6: lambda: row_scaling(run, s), 7: lambda: row_fid(run, s)}
    for r in rows:
        print(f"\n=== row {r}: {ROWS[r]} ===", flush=True)
        t0 = time.time()
        if time.time() > run.deadline - 10:
            entries = [{"case": ROWS[r], "unit": "", "ours": None, "ref": None, "ref_name": "", "ratio": None,
                        "ratio_name": "", "notes": ["skipped: --deadline reached"], "details": {}}]
        else:
            try:
                entries = builders[r]()
            except Exception as e:  # a bug in a row's assembly must not lose the other rows
                traceback.print_exc()
                entries = [{"case": ROWS[r], "unit": "", "ours": None, "ref": None, "ref_name": "", "ratio": None,
                            "ratio_name": "", "notes": [f"row failed: {type(e).__name__}: {e}"], "details": {}}]
        results["rows"][str(r)] = {"title": ROWS[r], "entries": entries, "seconds": time.time() - t0,
                                   "quick": args.quick, "date": meta["date"]}
        write(results, args.out)
        print(f"=== row {r} done in {time.time() - t0:.0f}s ===", flush=True)

    meta["seconds"] = time.time() - started
    write(results, args.out)
    print_table(results)
    print(f"\nwrote {args.out} and {Path(args.out).with_suffix('.md')} ({meta['seconds']:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
