"""GroupNorm + scale-shift + SiLU of the base64 `paper` U-Net: flax's nn.GroupNorm (what the U-Nets
use) against a per-channel reduction form of the same function, at the shapes one sampler step
(U-Net batch 32) and one training step (batch 64) meet (issue #18).

    python benchmarks/groupnorm.py --chain 10 --iters 3 --out gn.json   # on the GPU: ~2.5 min on an H100
    JAX_PLATFORMS=cpu python benchmarks/groupnorm.py --batches 2 --chain 2 --iters 2   # smoke run

The candidate ("chan") sums each channel over the spatial axes first and takes the group sums
from the [B, C] partials, where nn.GroupNorm reduces the input reshaped to [B, H, W, G, C/G] in one go.
Measured 2026-12-08 (BENCHMARKS.md): equal on an H100 within 2%, faster on XLA's CPU backend at these
shapes, and equal on the demo's U-Nets end to end, so the U-Nets kept nn.GroupNorm.

Each case times a chain of `--chain` dependent applications inside one jitted program
(x <- f(x) forward; x <- df/dx(x)^T ct for forward + backward), so the per-call dispatch and sync cost
(0.3-0.6 ms a call on an H200, BENCHMARKS.md) does not hide kernels of 0.1-1 ms. The bandwidth
figure counts the least traffic a fused implementation needs: forward = read x twice (statistics,
then normalise) + write y; forward + backward = 3 reads of x, 2 of the cotangent, 1 write of dx
beside the forward's (the vjp recomputes the statistics). Inputs that fit in the 50 MB L2 cache can
beat that bound.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.timing import measure  # noqa: E402


class PerChannelGroupNorm(nn.Module):
    """nn.GroupNorm's function (one-pass variance, float32 statistics, parameters "scale" and "bias")
    with each channel reduced over the spatial axes first."""

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, c, g = x.shape[0], x.shape[-1], self.num_groups
        axes = tuple(range(1, x.ndim - 1))
        count = x.size // b // g
        xf = x.astype(jnp.float32)

        def group_mean(v):  # [B, ..., C] -> [B, C]: each channel's group mean
            return jnp.repeat(jnp.sum(v, axis=axes).reshape(b, g, c // g).sum(-1) / count, c // g, axis=-1)

        mean = group_mean(xf)
        var = jnp.maximum(group_mean(jnp.square(xf)) - jnp.square(mean), 0.0)
        expand = lambda v: v.reshape((b,) + (1,) * len(axes) + (c,))  # noqa: E731
        mul = jax.lax.rsqrt(var + self.epsilon) * self.param("scale", nn.initializers.ones_init(), (c,))
        y = (x - expand(mean)) * expand(mul) + self.param("bias", nn.initializers.zeros_init(), (c,))
        return y.astype(self.dtype)


# (height, channels) of the GroupNorms in the base64 paper U-Net: the down path's widths and the up
# path's concatenated inputs (skip + current), at 64, 32, 16 and 8 pixels.
SHAPES = [(64, 512), (64, 1024), (32, 1024), (32, 2048), (16, 1536), (16, 3072), (8, 2048), (8, 4096)]


def make(impl, dtype):
    norm = (nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=dtype) if impl == "flax"
            else PerChannelGroupNorm(num_groups=32, dtype=dtype))

    def f(params, x, scale, shift):  # ResBlock's norm2: GroupNorm, FiLM scale-shift, SiLU
        return nn.silu(norm.apply(params, x) * (1.0 + scale) + shift)
    return norm, f


def time_case(impl, b, h, c, chain, iters, dtype):
    norm, f = make(impl, dtype)
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (b, h, h, c), dtype)
    ct = jax.random.normal(k[1], x.shape, dtype)
    scale = 0.1 * jax.random.normal(k[2], (b, 1, 1, c), dtype)
    shift = 0.1 * jax.random.normal(k[3], (b, 1, 1, c), dtype)
    params = norm.init(k[0], x)

    @jax.jit
    def fwd(x):
        return jax.lax.fori_loop(0, chain, lambda i, x: f(params, x, scale, shift).astype(dtype), x)

    @jax.jit
    def bwd(x):
        def body(i, x):
            _, vjp = jax.vjp(lambda x: f(params, x, scale, shift), x)
            return vjp(ct)[0].astype(dtype)
        return jax.lax.fori_loop(0, chain, body, x)

    out = {}
    nbytes = x.size * jnp.dtype(dtype).itemsize
    for name, fn, passes in (("fwd", fwd, 3), ("fwd_bwd", bwd, 9)):
        y = jax.block_until_ready(fn(x))  # compiles
        assert bool(jnp.isfinite(y.astype(jnp.float32)).all()), f"{impl} {name} chain is not finite"
        r = measure(lambda: fn(x), jax.block_until_ready, warmup=0, iters=iters, budget_s=float("inf"),
                    log=lambda *a, **k: None)
        s = r["median_s"] / chain
        out[name] = {"ms": s * 1e3, "bound_GBps": passes * nbytes / s / 1e9}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="32,64")
    p.add_argument("--chain", type=int, default=20)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 64)) + 1.5  # the two must agree first
    params = nn.GroupNorm(num_groups=32).init(jax.random.PRNGKey(1), x)
    ref = nn.GroupNorm(num_groups=32).apply(params, x)
    diff = float(jnp.max(jnp.abs(PerChannelGroupNorm().apply(params, x) - ref)))
    assert diff < 1e-4, f"the per-channel form differs from nn.GroupNorm by {diff}"
    rows = []
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, dtype {jnp.dtype(dtype).name}")
    print(f"{'shape':>22s} {'flax fwd':>9s} {'chan fwd':>9s} {'flax f+b':>9s} {'chan f+b':>9s}  (ms; GB/s)")
    tot = {}
    batches = [int(v) for v in a.batches.split(",")]
    for b in batches:
        for h, c in SHAPES:
            r = {"shape": [b, h, h, c]}
            for impl in ("flax", "chan"):
                r[impl] = time_case(impl, b, h, c, a.chain, a.iters, dtype)
                for n in ("fwd", "fwd_bwd"):
                    tot[(b, impl, n)] = tot.get((b, impl, n), 0.0) + r[impl][n]["ms"]
            rows.append(r)
            cell = lambda impl, n: f"{r[impl][n]['ms']:.3f}/{r[impl][n]['bound_GBps']:.0f}"  # noqa: E731
            print(f"{str(tuple(r['shape'])):>22s} {cell('flax', 'fwd'):>9s} {cell('chan', 'fwd'):>9s} "
                  f"{cell('flax', 'fwd_bwd'):>9s} {cell('chan', 'fwd_bwd'):>9s}", flush=True)
    for b in batches:
        print(f"batch {b} sum of the shapes above: fwd flax {tot[(b, 'flax', 'fwd')]:.3f} ms, chan "
              f"{tot[(b, 'chan', 'fwd')]:.3f} ms; fwd+bwd flax {tot[(b, 'flax', 'fwd_bwd')]:.3f}, chan "
              f"{tot[(b, 'chan', 'fwd_bwd')]:.3f}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "chain": a.chain,
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
