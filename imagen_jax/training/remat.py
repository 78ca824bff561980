"""`model.remat = "auto"`: the cheapest rematerialisation that fits the device.

Remat trades compute for memory: on a TPU pod chip (16-32 GiB) the paper models need it, on a
141 GB H200 the base64 paper step fits without it and runs ~15% faster. "auto" compiles the
training step for each policy, cheapest first (none -> dots_saveable -> nothing_saveable), reads
the compiled per-device memory (arguments + outputs - donated + temporaries) and keeps the first
that leaves `train.remat_margin` (default 10%) of the device's memory free. The compiled step of the choice is
kept (and `step.executable` hands it to the training loop), so choosing costs the compiles of the
policies that did not fit, not one more.
"""
import logging
import time

import jax
import jax.numpy as jnp
import ml_collections

from imagen_jax import parallel

# (name, UNetConfig.remat, UNetConfig.remat_policy), cheapest in compute first.
POLICIES = (("none", False, "nothing_saveable"),
            ("dots_saveable", True, "dots_saveable"),
            ("nothing_saveable", True, "nothing_saveable"))


def as_setting(value):
    """model.remat as True | False | "auto" (command-line overrides of a str field arrive as
    strings: "true", "off", ...)."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "auto":
            return "auto"
        if v in ("true", "on", "1", "yes"):
            return True
        if v in ("false", "off", "0", "no", "none", ""):
            return False
        raise ValueError(f"model.remat must be true, false or auto, got {value!r}")
    return bool(value)


def device_memory_bytes(config, mesh):
    """(bytes one device may use, where that figure came from), or (None, reason).

    `train.remat_memory_bytes` > 0 overrides what the device reports (a test's fake device, or a
    GPU shared with another process)."""
    fixed = int(config.train.get("remat_memory_bytes", 0) or 0)
    if fixed > 0:
        return fixed, "train.remat_memory_bytes"
    device = mesh.devices.flat[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # backends without memory statistics (CPU, abstract TPU topology devices)
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory_stats()['bytes_limit']"
    return None, f"{device.device_kind} reports no memory limit"


def step_bytes(compiled):
    mem = compiled.memory_analysis()
    mem = mem[0] if isinstance(mem, (list, tuple)) else mem
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
               + mem.temp_size_in_bytes)


def with_policy(config, remat, policy):
    """A copy of `config` with model.remat/remat_policy set (configs may be locked, and a locked
    ConfigDict will not change a field's type from str to bool)."""
    d = config.to_dict()
    d["model"]["remat"] = remat
    d["model"]["remat_policy"] = policy
    return ml_collections.ConfigDict(d)


def compile_step(trainer, batch_size):
    """AOT-compiles trainer.step for abstract, sharded inputs of the global batch."""
    state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   trainer.abstract_state, trainer.state_shardings)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=parallel.replicated(trainer.mesh))
    return trainer.step.lower(state, trainer.batch_struct(batch_size), rng).compile()


def choose(config, mesh, make_trainer, log=logging.info):
    """Picks the policy for `config` (whose model.remat is "auto").

    make_trainer(config) -> Trainer for a config with a concrete policy. Returns (trainer of the
    choice, its compiled step or None, report: {policy, microbatches, bytes, compile_s} of each
    tried, the limit, and the choice with its compile_s)."""
    batch = int(config.train.batch_size)
    margin = float(config.train.get("remat_margin", 0.1))
    limit, source = device_memory_bytes(config, mesh)
    if limit is None:
        # Nothing to measure against. On a CPU, host memory is what limits and remat only costs
        # time; an accelerator that reports no limit (an abstract TPU topology device) gets the
        # leanest policy, the safe choice for a fit check (pod configs set remat explicitly).
        name, remat, policy = POLICIES[0] if mesh.devices.flat[0].platform == "cpu" else POLICIES[-1]
        log(f"remat=auto: {source}; using remat={name}")
        return make_trainer(with_policy(config, remat, policy)), None, {"limit": None, "tried": [], "chosen": name}
    budget = int(limit * (1.0 - margin))
    dp = parallel.data_parallel_size(mesh)
    micro = int(config.train.get("microbatches", 1))
    # The policies in order at the configured microbatch count; then, if even the leanest does not
    # fit, the leanest with the microbatch count doubled while the batch still divides evenly.
    candidates = [(p, micro) for p in POLICIES]
    m = micro * 2
    while batch % (dp * m) == 0 and batch // (dp * m) >= 1:
        candidates.append((POLICIES[-1], m))
        m *= 2
    tried = []
    last = None
    for (name, remat, policy), micro in candidates:
        cfg = with_policy(config, remat, policy)
        cfg.train.microbatches = micro
        trainer = make_trainer(cfg)
        t0 = time.perf_counter()
        try:
            compiled = compile_step(trainer, batch)
            need = step_bytes(compiled)
        except Exception as e:  # XLA refuses to compile what cannot fit (RESOURCE_EXHAUSTED)
            if "RESOURCE_EXHAUSTED" not in str(e) and "Out of memory" not in str(e):
                raise
            compiled, need = None, None
        seconds = time.perf_counter() - t0
        tried.append({"policy": name, "microbatches": micro, "bytes": need, "compile_s": seconds})
        fits = need is not None and need <= budget
        log(f"remat=auto: policy {name}, microbatches {micro}: "
            + (f"{need / 2**30:.2f} GiB" if need is not None else "out of memory")
            + f" per device of {budget / 2**30:.2f} GiB usable ({limit / 2**30:.2f} GiB from {source}, "
            f"margin {margin:.0%}): " + ("fits" if fits else "does not fit") + f" (compiled in {seconds:.1f}s)")
        last = (trainer, compiled)
        if fits:
            return trainer, compiled, {"limit": limit, "budget": budget, "tried": tried, "chosen": name,
                                       "microbatches": micro, "compile_s": seconds}
    log(f"remat=auto: nothing fits at batch {batch}; keeping the leanest setting tried")
    return last[0], last[1], {"limit": limit, "budget": budget, "tried": tried, "chosen": tried[-1]["policy"],
                              "microbatches": tried[-1]["microbatches"], "compile_s": tried[-1]["compile_s"]}
