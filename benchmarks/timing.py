"""Timing and bookkeeping shared by both sides of every benchmark. Imports neither jax nor torch:
each side passes its own `sync` (jax.block_until_ready / torch.cuda.synchronize)."""
import statistics
import time


def measure(step, sync, *, warmup, iters, budget_s, min_iters=2, log=print, pipelined=0, blocks=4):
    """Runs `step()` `warmup` times untimed, then up to `iters` timed times.

    step: one iteration; returns whatever `sync` must wait for.
    sync: blocks until the device has finished that result (so each timed interval covers
      exactly one iteration's device work, not just its dispatch).
    budget_s: stop timing early once at least `min_iters` iterations are in and this many seconds
      have passed since the first warm-up started.
    pipelined: if > 0, then also times up to `blocks` runs of `pipelined` consecutive steps with one
      sync at the end of each run (at least 2 runs, within budget_s). A training loop syncs only to
      log, so the host's dispatch of step i+1 overlaps the device's work on step i; the per-step
      sync above leaves the device idle for each dispatch (for a train state of ~3,200 donated
      arrays that is milliseconds). Both sides of a comparison get the same treatment.
    Returns {median_s, min_s, max_s, iters, warmup, first_s (the first warm-up call, compile
    included), times_s}, plus {pipelined_median_s (per step), pipelined_block, pipelined_times_s
    (per step, one a run)} with `pipelined`.
    """
    t_start = time.perf_counter()
    first_s = None
    for i in range(warmup):
        t0 = time.perf_counter()
        sync(step())
        if first_s is None:
            first_s = time.perf_counter() - t0
            log(f"    warm-up 1 took {first_s:.2f}s", flush=True)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - t0)
        if len(times) >= min_iters and time.perf_counter() - t_start > budget_s:
            break
    med = statistics.median(times)
    log(f"    {len(times)} timed iterations: median {med * 1e3:.1f} ms "
        f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})", flush=True)
    out = {"median_s": med, "min_s": min(times), "max_s": max(times), "iters": len(times),
           "warmup": warmup, "first_s": first_s, "times_s": times}
    if pipelined > 0:
        runs = []
        for _ in range(max(blocks, 2)):
            t0 = time.perf_counter()
            for _ in range(pipelined):
                last = step()
            sync(last)
            runs.append((time.perf_counter() - t0) / pipelined)
            if len(runs) >= 2 and time.perf_counter() - t_start > budget_s:
                break
        pmed = statistics.median(runs)
        log(f"    {len(runs)} runs of {pipelined} steps, one sync a run: median {pmed * 1e3:.1f} ms a step "
            f"(min {min(runs) * 1e3:.1f}, max {max(runs) * 1e3:.1f})", flush=True)
        out.update(pipelined_median_s=pmed, pipelined_block=pipelined, pipelined_times_s=runs)
    return out


def is_oom(exc):
    """True for an out-of-memory error from XLA (RESOURCE_EXHAUSTED) or torch."""
    text = f"{type(exc).__name__}: {exc}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "OutOfMemoryError", "out of memory",
                                   "Out of memory", "Failed to allocate", "OOM"))


def short_error(exc, limit=300):
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + " ..."
