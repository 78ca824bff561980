"""This project's side of each benchmark (JAX). Each job runs in its own process (see run.py), takes
a spec dict and returns a JSON-able dict. Never imports torch."""
import gc
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import cases
from benchmarks.timing import is_oom, measure, short_error


def log(*a, **k):
    k.setdefault("flush", True)
    print(*a, **k)


def _sync_tree(x):
    return jax.block_until_ready(x)


# --------------------------------------------------------------------------- device


def info(spec):
    """Device facts and the measured dense matmul peak (FLOP/s) that MFU is taken against."""
    devs = jax.devices()
    backend = jax.default_backend()
    n = int(spec.get("matmul_n", 8192))
    dtype = jnp.bfloat16 if backend != "cpu" else jnp.float32  # CPU bf16 matmuls are emulated
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(jnp.matmul)
    log(f"  peak: {n}^3 {jnp.dtype(dtype).name} matmul on {devs[0].device_kind}")
    t = measure(lambda: f(a, b), _sync_tree, warmup=3, iters=int(spec.get("iters", 20)),
                budget_s=float(spec.get("budget_s", 30)), min_iters=3, log=log)
    peak = 2.0 * n ** 3 / t["median_s"]
    log(f"  measured peak {peak / 1e12:.1f} TFLOP/s")
    return {"backend": backend, "device_kind": devs[0].device_kind, "device_count": len(devs),
            "jax_version": jax.__version__, "peak_flops": peak, "matmul_n": n,
            "matmul_dtype": jnp.dtype(dtype).name}


# --------------------------------------------------------------------------- training step


def _device_batch(trainer, global_batch, seed):
    c = trainer.config
    size, lowres = cases.image_sizes(c)
    host = cases.random_inputs(global_batch, size, lowres, trainer.text_len, trainer.model_cfg.text_dim, seed)
    host["text"] = host["text"].astype(jnp.dtype(trainer.model_cfg.dtype))
    return {k: jax.device_put(v, trainer.batch_shardings[k]) for k, v in host.items() if k in trainer.batch_shardings}


def _train_at(config, mesh, global_batch, spec):
    from imagen_jax import parallel, training

    config.train.batch_size = global_batch
    trainer = training.Trainer(config, mesh)
    n_params = int(training.count_state_params(trainer.abstract_params))
    state = trainer.init(jax.random.PRNGKey(0))
    batch = _device_batch(trainer, global_batch, seed=1)
    rng = jax.random.PRNGKey(2)
    # With remat="auto" the Trainer compiled the step while choosing; that executable is used.
    compiled, compile_s, compile_reused = training.step.executable(trainer, state, batch, rng)
    log(f"    compiled in {compile_s:.1f}s" + (" (by remat=auto's choice)" if compile_reused else ""))
    compiled_flops = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        compiled_flops = float((cost or {}).get("flops", 0.0)) or None
    except Exception as e:  # some backends give no cost analysis
        log(f"    (no compiled cost analysis: {short_error(e)})")
    mem_bytes = None
    try:
        m = compiled.memory_analysis()
        mem_bytes = int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                        + m.temp_size_in_bytes)
    except Exception:
        pass
    holder = {"state": state, "metrics": None}
    del state

    def step():
        holder["state"], holder["metrics"] = compiled(holder["state"], batch, rng)
        # One executable: its metrics and its new step counter are ready together.
        return holder["metrics"], holder["state"].step

    t = measure(step, _sync_tree, warmup=int(spec["warmup"]), iters=int(spec["iters"]),
                budget_s=float(spec["budget_s"]) * 0.6, log=log, pipelined=int(spec.get("pipelined", 0)))
    loss = float(holder["metrics"]["loss"])
    nonfinite = int(holder["state"].nonfinite_step)
    model_flops = None
    try:
        model_flops = training.model_flops(config, global_batch) or None  # 3x the forward, no remat
    except Exception as e:
        log(f"    (model FLOPs not available: {short_error(e)})")
    ndev = mesh.size
    out = {"batch": global_batch, "devices": ndev, "mesh": dict(mesh.shape), "params": n_params,
           "compile_s": compile_s, "compile_reused": compile_reused, "timing": t, "images_per_s": global_batch / t["median_s"],
           "images_per_s_pipelined": global_batch / t["pipelined_median_s"] if "pipelined_median_s" in t else None,
           "loss": loss, "nonfinite_step": nonfinite, "memory_bytes_per_device": mem_bytes,
           "compiled_flops_per_device": compiled_flops, "model_flops": model_flops,
           "dp_size": int(parallel.data_parallel_size(mesh)),
           "remat_report": getattr(trainer, "remat_report", None),  # what remat="auto" tried and kept
           "settings": (f"{config.model.dtype}, remat={config.model.remat}, {config.optimizer.name}, "
                        f"clip {config.optimizer.clip_norm}, EMA {config.optimizer.ema_decay}, "
                        f"attention {config.model.attention_impl}")}
    peak = spec.get("peak_flops")
    if peak:
        per_dev = model_flops / ndev if model_flops else compiled_flops
        if per_dev:
            out["mfu"] = per_dev / t["median_s"] / peak
            out["mfu_flops_source"] = "model (3x forward, no remat)" if model_flops else "compiled"
            if "pipelined_median_s" in t:
                out["mfu_pipelined"] = per_dev / t["pipelined_median_s"] / peak
        if compiled_flops:
            out["hfu_compiled"] = compiled_flops / t["median_s"] / peak
    holder.clear()
    return out


def train(spec):
    """Training step (forward + backward + optimizer + EMA) of a stage config at the first batch
    of spec['batches'] (per device) that fits."""
    from imagen_jax import parallel

    config = cases.spec_config(spec)
    config.mesh.update(spec.get("mesh") or {})
    mesh = parallel.make_mesh(config.mesh)
    dp = parallel.data_parallel_size(mesh)
    tried = []
    batches = list(spec["batches"])
    for i, per_dev in enumerate(batches):
        gb = int(per_dev) * dp
        log(f"  ours train {spec['stage']}:{spec['variant']} batch {gb} on mesh {dict(mesh.shape)} "
            f"({config.model.dtype}, remat={config.model.remat}, attention={config.model.attention_impl})")
        try:
            out = _train_at(config, mesh, gb, spec)
            out.update(per_device_batch=int(per_dev), tried=tried)
            return out
        except Exception as e:
            if not is_oom(e) or i == len(batches) - 1:
                raise
            log(f"    batch {gb} does not fit: {short_error(e, 160)}")
            tried.append({"batch": gb, "error": short_error(e, 160)})
        # Outside the except block, so the traceback (and the arrays its frames hold) is gone.
        gc.collect()
        jax.clear_caches()
    raise RuntimeError("no batch given")


# --------------------------------------------------------------------------- sampling


def _random_stage(config, mesh):
    import flax.linen as nn

    from imagen_jax import cascade
    from imagen_jax.models import UNet, UNetConfig, init_inputs

    model_cfg = UNetConfig.from_dict(config.model.to_dict())
    model = UNet(model_cfg)
    _, shardings = cascade.param_shardings(config, mesh)
    init = jax.jit(lambda r: nn.meta.unbox(model.init(r, **init_inputs(model_cfg, text_len=8))["params"]),
                   out_shardings=shardings)
    params = init(jax.random.PRNGKey(0))
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
    return cascade.Stage(config=config, params=params, source="random", step=0), n_params


def sample(spec):
    """One stage's sampling program (StageSampler: the project's only sampler path) for a batch of
    prompts' embeddings: images/s."""
    from imagen_jax import cascade, parallel

    config = cases.spec_config(spec)
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    stage, n_params = _random_stage(config, mesh)
    settings = cascade.StageSettings(sampler=spec["sampler"], steps=int(spec["steps"]),
                                     guidance=float(spec["guidance"]), thresholding="dynamic")
    sampler = cascade.StageSampler(stage, mesh, settings)
    b = int(spec["batch"])
    size, lowres_size = cases.image_sizes(config)
    host = cases.random_inputs(b, size, lowres_size, config.text.max_length, config.model.text_dim, seed=3)
    text = jnp.asarray(host["text"], jnp.dtype(config.model.dtype))
    mask = jnp.asarray(host["text_mask"])
    lowres = jnp.asarray(host["lowres"]) if lowres_size else None
    rng = jax.random.PRNGKey(4)
    log(f"  ours sample {spec['stage']}:{spec['variant']} {settings.sampler} {settings.steps} steps, "
        f"batch {b}, guidance {settings.guidance}, dynamic thresholding")
    last = {}

    def step():
        last["images"] = sampler(text, mask, lowres, rng)
        return last["images"]

    t = measure(step, _sync_tree, warmup=1, iters=int(spec["iters"]), budget_s=float(spec["budget_s"]) * 0.7, log=log)
    imgs = np.asarray(last["images"])  # the last timed run's (another run would cost a batch's time)
    return {"batch": b, "params": n_params, "timing": t, "images_per_s": b / t["median_s"],
            "steps": settings.steps, "sampler": settings.sampler, "network_evals": settings.steps,
            "finite": bool(np.isfinite(imgs).all()), "image_shape": list(imgs.shape)}


# --------------------------------------------------------------------------- T5


def t5(spec):
    """T5 encoder forward (random weights, bf16) on [B, L] tokens: tokens/s."""
    from imagen_jax.text import t5 as t5lib

    d = spec["dims"]
    cfg = t5lib.T5Config(vocab_size=d["vocab_size"], d_model=d["d_model"], num_heads=d["num_heads"],
                         head_dim=d["d_kv"], d_ff=d["d_ff"], num_layers=d["num_layers"],
                         dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    log(f"  ours T5 encoder ({cfg.size_name or 'custom'}) bf16, batch {spec['batch']} x {spec['length']} tokens")
    params = t5lib.init_params(cfg, 0)
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
    b, L = int(spec["batch"]), int(spec["length"])
    ids = jax.random.randint(jax.random.PRNGKey(1), (b, L), 1, cfg.vocab_size)
    mask = jnp.ones((b, L), bool)
    t = measure(lambda: t5lib.encode(cfg, params, ids, mask), _sync_tree, warmup=2,
                iters=int(spec["iters"]), budget_s=float(spec["budget_s"]) * 0.7, log=log)
    return {"batch": b, "length": L, "params": n_params, "size_name": cfg.size_name, "timing": t,
            "tokens_per_s": b * L / t["median_s"]}


# --------------------------------------------------------------------------- FID Inception


def fid(spec):
    """FID Inception pool3 features (imagen_jax.evaluation.inception.features) of uint8 images:
    images/s, float32 (the reference path) and bfloat16."""
    from imagen_jax.evaluation import inception

    wpath = spec.get("weights_npz")
    if wpath and os.path.exists(wpath):
        with np.load(wpath) as z:
            params = inception.params_from_state_dict({k: z[k] for k in z.files}, wpath)
        source = "pytorch-fid random model (same weights as the peer)"
    else:
        params = inception.init_random(0)
        source = "init_random (peer weights not available)"
    params = jax.device_put(params)  # on the device once, as the peer's model is
    images = cases.random_images(int(spec["n_images"]), int(spec["size"]), seed=5)
    out = {"n_images": int(spec["n_images"]), "size": int(spec["size"]), "batch_size": int(spec["batch_size"]),
           "weights": source}
    # "float32_tf32": float32 with precision="default" (TF32 convolutions on GPU), the precision the
    # peer's cuDNN convolutions run at by default; "float32" is the full-precision reference path.
    for name in spec.get("dtypes", ["float32", "float32_tf32", "bfloat16"]):
        dtype = jnp.dtype(name.split("_")[0])
        precision = "default" if name.endswith("_tf32") else "highest"
        log(f"  ours FID features {name}: {images.shape[0]} images {images.shape[1]}px, batch {spec['batch_size']}")
        t = measure(lambda: inception.features(params, images, batch_size=int(spec["batch_size"]), dtype=dtype,
                                               precision=precision),
                    lambda x: x, warmup=1, iters=int(spec["iters"]),
                    budget_s=float(spec["budget_s"]) * 0.4, log=log)
        out[name] = {"timing": t, "images_per_s": images.shape[0] / t["median_s"]}
    if spec.get("feats_out"):
        feats = inception.features(params, images[:8], batch_size=8)
        np.save(spec["feats_out"], feats)
    return out
