"""Why is XLA's bf16 GEMM slower than torch's on the same GPU? (issue #18)

    python benchmarks/gemm.py --out gemm.json             # every XLA flag set, then torch
    python benchmarks/gemm.py --n 1024 --iters 3          # smoke run (CPU works too)

Each XLA flag set runs in its own child process (XLA reads XLA_FLAGS once, at backend start; an
unknown flag aborts that child only). Two timings per side, both on random normal bf16 data:
- `call`: one jitted n^3 product per host call, host clock around call + block_until_ready (what
  benchmarks/ours.py measured as "the peak"): includes the per-call dispatch and sync cost.
- `chain`: K dependent products x <- (x @ B[k % 4]) / sqrt(n) inside one program (a lax.fori_loop
  on the JAX side, CUDA events around K eager products on the torch side): the GEMM alone. The
  scale keeps x at unit variance (no inf/NaN, which can change a GEMM's speed), and it fuses into
  the GEMM's epilogue on both sides; four right-hand sides defeat any reuse across iterations.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FLAG_SETS = {
    "default": "",
    "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
    "cublaslt": "--xla_gpu_enable_cublaslt=true",
    "autotune0": "--xla_gpu_autotune_level=0",
    "no_triton_cublaslt": "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cublaslt=true",
}


def jax_side(n, iters, chain):
    import jax
    import jax.numpy as jnp

    dt = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), dt)
    bs = jax.random.normal(kb, (4, n, n), dt)
    scale = 1.0 / n ** 0.5
    one = jax.jit(jnp.matmul)
    t_call = []
    for i in range(3 + iters):
        t0 = time.perf_counter()
        jax.block_until_ready(one(a, bs[i % 4]))
        if i >= 3:
            t_call.append(time.perf_counter() - t0)

    @jax.jit
    def run_chain(x, bs):
        def body(k, x):
            return (jnp.matmul(x, bs[k % 4], preferred_element_type=jnp.float32) * scale).astype(x.dtype)
        return jax.lax.fori_loop(0, chain, body, x)

    jax.block_until_ready(run_chain(a, bs))
    t_chain = []
    for _ in range(max(3, iters // 4)):
        t0 = time.perf_counter()
        out = jax.block_until_ready(run_chain(a, bs))
        t_chain.append((time.perf_counter() - t0) / chain)
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all()), "chain overflowed"
    return {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "call_s": statistics.median(t_call), "chain_s": statistics.median(t_chain)}


def torch_side(n, iters, chain):
    import torch

    if not torch.cuda.is_available():
        return {"error": "no CUDA device for torch"}
    torch.manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    bs = torch.randn(4, n, n, device="cuda", dtype=torch.bfloat16)
    scale = 1.0 / n ** 0.5
    t_call = []
    for i in range(3 + iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        _ = a @ bs[i % 4]
        torch.cuda.synchronize()
        if i >= 3:
            t_call.append(time.perf_counter() - t0)
    t_chain = []
    for _ in range(1 + max(3, iters // 4)):
        x = a
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for k in range(chain):
            x = torch.matmul(x, bs[k % 4]) * scale
        end.record()
        torch.cuda.synchronize()
        t_chain.append(start.elapsed_time(end) / 1e3 / chain)
    return {"torch": torch.__version__, "call_s": statistics.median(t_call),
            "chain_s": statistics.median(t_chain[1:])}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--chain", type=int, default=20)
    p.add_argument("--sets", default=",".join(FLAG_SETS), help="comma-separated names from FLAG_SETS")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        fn = jax_side if a.worker == "jax" else torch_side
        print("RESULT " + json.dumps(fn(a.n, a.iters, a.chain)), flush=True)
        return
    flops = 2.0 * a.n ** 3
    rows = {}
    for name in [s for s in a.sets.split(",") if s] + ["torch"]:
        env = dict(os.environ)
        if name != "torch":
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FLAG_SETS[name]).strip()
        cmd = [sys.executable, __file__, "--worker", "torch" if name == "torch" else "jax",
               "--n", str(a.n), "--iters", str(a.iters), "--chain", str(a.chain)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            rows[name] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
        else:
            r = json.loads(line[0][7:])
            for k in ("call_s", "chain_s"):
                if k in r:
                    r[k.replace("_s", "_tflops")] = flops / r[k] / 1e12
            rows[name] = r
        print(f"{name:22s} {json.dumps(rows[name])}", flush=True)
    print(f"\n{'case':22s} {'call TFLOP/s':>13s} {'chain TFLOP/s':>14s}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:22s} error: {r['error']}")
        else:
            print(f"{name:22s} {r['call_tflops']:13.1f} {r['chain_tflops']:14.1f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"n": a.n, "chain": a.chain, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
