"""The training loop of every cascade stage: resume, data, text conditioning, metrics, previews,
checkpoints, preemption and divergence handling. `imagen_jax.train` is its command line.

Resume order: if WORKDIR holds checkpoints, training resumes from the latest one, exactly
(parameters, optimizer state, EMA, step and data position); otherwise it starts from scratch.
SIGTERM (Cloud TPU preemption) finishes the current step, writes a checkpoint and returns; on a
multi-host run every host stops at the same step (orbax's `reached_preemption`).

Watching a run: metrics go to stdout, TensorBoard (WORKDIR/tensorboard) and WORKDIR/metrics.jsonl
(one JSON object per logged step); the first step's compile time is logged on its own and kept out
of the throughput and MFU; device memory is logged where the backend reports it;
`train.profile_steps=a,b` writes a jax.profiler trace to WORKDIR/profile; previews go to
TensorBoard and WORKDIR/samples. Every path may be local or gs:// (imagen_jax/paths.py).
"""
import json
import signal
import sys
import tempfile
import time

from absl import logging

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import cascade, checkpoints, conditioning, parallel, paths
from imagen_jax.data import pipeline
from imagen_jax.training import step as step_lib
from imagen_jax.training import validate

# Per-device dense bf16 peak, for the MFU estimate (datasheet figures).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12}


class TrainingError(RuntimeError):
    pass


def peak_flops(config):
    if config.train.peak_flops:
        return float(config.train.peak_flops)
    kind = jax.devices()[0].device_kind
    for name, value in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return value
    return 0.0


class Preemption:
    """Turns SIGTERM into a flag the loop checks after each step. Multi-host runs leave SIGTERM to
    jax.distributed's preemption notifier (a Python handler would replace it); the loop asks
    orbax's `reached_preemption(step)`, true on every host at the same step."""

    def __init__(self):
        self.requested = False
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        logging.warning("SIGTERM received: checkpointing after the current step")
        self.requested = True


class MetricWriter:
    """stdout, TensorBoard (tensorboardX; gs:// through google-cloud-storage) and WORKDIR/metrics.jsonl,
    from process 0. A resumed run drops the jsonl lines past its checkpoint (those steps are
    trained again). GCS objects cannot be appended to, so the file is rewritten whole each time."""

    def __init__(self, workdir, start_step=0):
        self.tb = None
        self.jsonl = paths.join(workdir, "metrics.jsonl")
        self.lines = []
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(paths.join(workdir, "tensorboard"))
            if paths.isfile(self.jsonl):
                old = [ln for ln in paths.read_text(self.jsonl).splitlines() if ln.strip()]
                self.lines = [ln for ln in old if json.loads(ln).get("step", 0) <= start_step]
                if len(self.lines) != len(old):
                    paths.write_text(self.jsonl, "".join(ln + "\n" for ln in self.lines))

    def write(self, step, metrics):
        if jax.process_index() != 0:
            return
        line = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        print(f"step={step} {line}", flush=True)
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()
        self.lines.append(json.dumps({"step": int(step), "time": round(time.time(), 3), **metrics}))
        if paths.is_remote(self.jsonl):
            paths.write_text(self.jsonl, "\n".join(self.lines) + "\n")
        else:
            with open(self.jsonl, "a") as f:
                f.write(self.lines[-1] + "\n")

    def image(self, step, tag, image):
        if self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def check_batch(config, mesh):
    gb, pc = config.train.batch_size, jax.process_count()
    step_lib.check_batch(gb, mesh, int(config.train.get("microbatches", 1)))
    if gb % pc:
        raise parallel.MeshError(f"train.batch_size={gb} is not divisible by the {pc} processes")


def preview(trainer, state, cond, config, host, workdir, step, writer=None, samplers=None):
    """A grid of samples from the EMA parameters: the config's fixed prompts for a base stage; for
    an SR stage, the current batch's captions and low-res images. `samplers`: a dict the loop keeps
    across previews, so the sampling program compiles once per run, not at every preview."""
    from PIL import Image

    stage = cascade.Stage(config=config, params=state.ema_params, source=workdir, step=step)
    if stage.image_size != config.data.image_size:
        logging.info("no previews for crop-trained stages (they sample at %d)", stage.image_size)
        return
    if stage.is_sr:
        n = min(8, len(host["captions"]))
        prompts, lowres = list(host["captions"][:n]), host["lowres"][:n]
    else:
        prompts, lowres = list(config.train.sample_prompts), None
    text, mask = cond(prompts)
    settings = cascade.StageSettings(sampler=config.sampling.sampler, steps=int(config.sampling.steps),
                                     guidance=float(config.sampling.guidance),
                                     thresholding=config.sampling.thresholding,
                                     percentile=float(config.sampling.percentile),
                                     aug_level=float(config.sampling.get("aug_level", 0.0)) if stage.is_sr else 0.0)
    dp = parallel.data_parallel_size(trainer.mesh)
    text, pad = cascade.pad_batch(np.asarray(text), dp)
    mask, _ = cascade.pad_batch(np.asarray(mask), dp)
    if lowres is not None:
        lowres, _ = cascade.pad_batch(np.asarray(lowres), dp)
    samplers = {} if samplers is None else samplers
    if "stage" in samplers:
        sampler = samplers["stage"].with_params(stage.params, step)
    else:
        sampler = cascade.StageSampler(stage, trainer.mesh, settings)
    samplers["stage"] = sampler
    images = sampler(text, mask, lowres, jax.random.PRNGKey(0))
    images = cascade.to_uint8(jax.device_get(images))[: len(prompts)]
    if jax.process_index() == 0:
        import io

        sheet = cascade.grid(images)
        buf = io.BytesIO()
        Image.fromarray(sheet).save(buf, format="PNG")
        paths.makedirs(paths.join(workdir, "samples"))
        paths.write_bytes(paths.join(workdir, "samples", f"step_{step:08d}.png"), buf.getvalue())
        if writer is not None:
            writer.image(step, "preview", sheet)


def device_memory():
    """{'mem_gib', 'peak_mem_gib'} of the busiest local device, or {} where the backend does not
    report memory (CPU)."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    stats = [s for s in stats if s and "bytes_in_use" in s]
    if not stats:
        return {}
    gib = float(1 << 30)
    out = {"mem_gib": max(s["bytes_in_use"] for s in stats) / gib}
    if all("peak_bytes_in_use" in s for s in stats):
        out["peak_mem_gib"] = max(s["peak_bytes_in_use"] for s in stats) / gib
    return out


class Progress:
    """A tqdm bar with ETA when stdout is a terminal (on process 0); silent otherwise."""

    def __init__(self, start, end):
        self.bar = None
        if jax.process_index() == 0 and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=end, initial=start, unit="step", dynamic_ncols=True)

    def update(self, loss=None):
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4g}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Profiler:
    """jax.profiler trace of steps [a, b) into WORKDIR/profile. The trace is written to a local
    directory and copied through the path layer, so a gs:// workdir works like a local one."""

    def __init__(self, config, workdir):
        self.range = validate.profile_range(config)
        self.dest = paths.join(workdir, "profile")
        self.local = None

    def before(self, step):
        if self.range and step == self.range[0]:
            self.local = tempfile.mkdtemp(prefix="imagen_jax_profile_")
            jax.profiler.start_trace(self.local)

    def after(self, step, state):
        """`step`: the number of steps done."""
        if self.local is not None and step >= self.range[1]:
            self.stop(state)

    def stop(self, state=None):
        if self.local is None:
            return
        if state is not None:
            jax.block_until_ready(state)
        jax.profiler.stop_trace()
        paths.copy_tree(self.local, paths.join(self.dest, f"process_{jax.process_index()}"))
        import shutil
        shutil.rmtree(self.local, ignore_errors=True)
        self.local = None
        print(f"profile written to {self.dest}", flush=True)


def enable_compilation_cache(config):
    cache = str(config.train.get("compilation_cache", "") or "")
    if cache:
        # Every program is cached, not only the slow ones: a restart after a preemption then
        # skips compiling the step.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        if jax.config.jax_compilation_cache_dir != cache:
            jax.config.update("jax_compilation_cache_dir", cache)
            # jax opens its cache once, at the first compile that uses it: a process that has
            # compiled before (a notebook, an earlier run in the same process) would otherwise
            # keep writing to the old directory and ignore this one.
            from jax._src import compilation_cache

            compilation_cache.reset_cache()


def train(config, workdir, stop_after=0):
    """Runs (or resumes) training; returns the final host-side metrics and state.

    Nothing is written before the config, the workdir's bucket and any earlier run in the
    workdir have been checked."""
    validate.check(config)
    jax.config.update("jax_threefry_partitionable", True)
    parallel.maybe_initialize_distributed()
    workdir = paths.absolute(workdir)
    paths.check_bucket(workdir)
    validate.check_workdir(config, workdir)
    enable_compilation_cache(config)
    mesh = parallel.make_mesh(config.mesh)
    check_batch(config, mesh)
    validate.check_orphan_checkpoints(workdir)
    mngr = checkpoints.manager(workdir, keep=int(config.train.keep_ckpts))
    latest = mngr.latest_step()
    trainer = step_lib.Trainer(config, mesh)
    n_params = step_lib.count_state_params(trainer.abstract_params)

    if latest is not None:
        restored, meta = checkpoints.restore(mngr, latest, trainer.abstract_state, trainer.state_shardings)
        state = step_lib.TrainState(step=jnp.asarray(meta["step"], jnp.int32), nonfinite_step=jnp.asarray(-1, jnp.int32),
                                    **restored)
        state = jax.device_put(state, trainer.state_shardings)
        print(f"resumed from step {meta['step']} ({checkpoints.checkpoint_dir(workdir)})", flush=True)
    else:
        state = trainer.init(jax.random.PRNGKey(config.seed))
    # Only now: a workdir whose checkpoints do not restore into this config is left as it was
    # (no config.json, no vocabulary written).
    if jax.process_index() == 0:
        checkpoints.save_config(workdir, config)
    cond = conditioning.build(config, workdir=workdir, mesh=mesh)  # T5 sharded over the mesh
    logging.info("stage %s: %d parameters; mesh %s; text: %s", config.stage, n_params, dict(mesh.shape),
                 cond.description)
    print(f"stage={config.stage} params={n_params} mesh={dict(mesh.shape)} text: {cond.description}", flush=True)
    start = int(jax.device_get(state.step))

    global_batch = int(config.train.batch_size)
    data = pipeline.make_iterator(config, global_batch=global_batch, process_index=jax.process_index(),
                                  process_count=jax.process_count(), start_step=start)
    rng = jax.random.PRNGKey(config.seed + 1)
    writer = MetricWriter(workdir, start_step=start)
    preempt = Preemption()
    profiler = Profiler(config, workdir)
    compiled = None
    samplers = {}  # the preview's sampling program, compiled at the first preview only
    flops = 0.0
    peak = peak_flops(config)
    last_t, last_step = time.time(), start
    metrics_host = {}
    compile_s = None
    num_steps = int(config.train.num_steps)
    end = num_steps if not stop_after else min(num_steps, start + stop_after)
    progress = Progress(start, end)

    def save(step):
        nf = int(jax.device_get(state.nonfinite_step))
        if nf >= 0:
            raise TrainingError(f"loss or gradient norm was NaN/Inf at step {nf}; stopping without "
                                f"checkpointing (the last good checkpoint is kept)")
        checkpoints.save(mngr, step, state, {"step": step, "data_position": step})

    try:
        for step in range(start, end):
            host = next(data)
            text, mask = cond.batch(host["captions"])
            # astype, not np.asarray: embeddings T5 just computed stay on the device (see
            # host_local_batch_to_global).
            local = {"image": host["image"], "text": text.astype(jnp.dtype(trainer.model_cfg.dtype)),
                     "text_mask": mask.astype(bool)}
            if trainer.is_sr:
                local["lowres"] = host["lowres"]
            batch = parallel.host_local_batch_to_global(local, mesh)
            if compiled is None:
                compiled, compile_s, reused = step_lib.executable(trainer, state, batch, rng)
                print(f"compiled the train step in {compile_s:.1f}s"
                      + (" (while remat=auto chose its policy; not compiled again)" if reused else ""), flush=True)
                if peak:
                    flops = step_lib.model_flops(config, global_batch) / jax.device_count()
                last_t = time.time()  # throughput and MFU count running time only
            profiler.before(step)
            state, metrics = compiled(state, batch, rng)
            done = step + 1
            profiler.after(done, state)
            logged = done % config.train.log_every == 0 or done == end
            if logged:
                m = jax.device_get(metrics)
                nf = int(jax.device_get(state.nonfinite_step))
                if nf >= 0:
                    raise TrainingError(f"loss or gradient norm was NaN/Inf at step {nf}; stopping "
                                        f"(the last good checkpoint is kept)")
                dt = max(time.time() - last_t, 1e-9)
                sps = (done - last_step) / dt
                metrics_host = {k: float(v) for k, v in m.items()}
                metrics_host.update({"steps_per_s": sps,
                                     "images_per_s_per_device": sps * global_batch / jax.device_count()})
                if peak and flops:
                    metrics_host["mfu"] = flops * sps / peak  # model FLOPs per device / peak
                if compile_s is not None:
                    metrics_host["compile_s"] = compile_s
                    compile_s = None
                metrics_host.update(device_memory())
                writer.write(done, metrics_host)
                last_t, last_step = time.time(), done
            progress.update(metrics_host.get("loss") if logged else None)
            if config.train.sample_every and done % config.train.sample_every == 0:
                t0 = time.time()
                preview(trainer, state, cond, config, host, workdir, done, writer, samplers)
                last_t += time.time() - t0  # sampling (and its compile) is not training throughput
            # Called every step on every host, as the preemption sync protocol requires.
            preempted = mngr.reached_preemption(done) or preempt.requested
            if done % config.train.ckpt_every == 0 or done == end or preempted:
                save(done)
            if preempted:
                print(f"preempted: checkpoint written at step {done}", flush=True)
                break
    finally:
        progress.close()
        profiler.stop()
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
    return metrics_host, state
