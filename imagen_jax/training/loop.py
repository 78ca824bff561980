"""The training loop of every cascade stage: resume, data, text conditioning, metrics, previews,
checkpoints, preemption and divergence handling. `imagen_jax.train` is its command line.

Resume order: if WORKDIR holds checkpoints, training resumes from the latest one, exactly
(parameters, optimizer state, EMA, step and data position); otherwise it starts from scratch.
SIGTERM (Cloud TPU preemption) finishes the current step, writes a checkpoint and returns.
"""
import os
import signal
import time

from absl import logging

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import cascade, checkpoints, conditioning, parallel
from imagen_jax.data import pipeline
from imagen_jax.training import step as step_lib

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
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        logging.warning("SIGTERM received: checkpointing after the current step")
        self.requested = True


class MetricWriter:
    def __init__(self, workdir):
        self.tb = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step, metrics):
        if jax.process_index() != 0:
            return
        line = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        print(f"step={step} {line}", flush=True)
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def check_batch(config, mesh):
    gb, pc = config.train.batch_size, jax.process_count()
    step_lib.check_batch(gb, mesh, int(config.train.get("microbatches", 1)))
    if gb % pc:
        raise parallel.MeshError(f"train.batch_size={gb} is not divisible by the {pc} processes")


def preview(trainer, state, cond, config, host, workdir, step):
    """A grid of samples from the EMA parameters: the config's fixed prompts for a base stage; for
    an SR stage, the current batch's captions and low-res images."""
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
                                     percentile=float(config.sampling.percentile))
    dp = parallel.data_parallel_size(trainer.mesh)
    text, pad = cascade.pad_batch(np.asarray(text), dp)
    mask, _ = cascade.pad_batch(np.asarray(mask), dp)
    if lowres is not None:
        lowres, _ = cascade.pad_batch(np.asarray(lowres), dp)
    images = cascade.StageSampler(stage, trainer.mesh, settings)(text, mask, lowres, jax.random.PRNGKey(0))
    images = cascade.to_uint8(jax.device_get(images))[: len(prompts)]
    if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        Image.fromarray(cascade.grid(images)).save(os.path.join(workdir, "samples", f"step_{step:08d}.png"))


def train(config, workdir, stop_after=0):
    """Runs (or resumes) training; returns the final host-side metrics."""
    jax.config.update("jax_threefry_partitionable", True)
    parallel.maybe_initialize_distributed()
    mesh = parallel.make_mesh(config.mesh)
    check_batch(config, mesh)
    if jax.process_index() == 0:
        checkpoints.save_config(workdir, config)
    cond = conditioning.build(config, workdir=workdir)
    trainer = step_lib.Trainer(config, mesh)
    n_params = step_lib.count_state_params(trainer.abstract_params)
    logging.info("stage %s: %d parameters; mesh %s; text: %s", config.stage, n_params, dict(mesh.shape),
                 cond.description)
    print(f"stage={config.stage} params={n_params} mesh={dict(mesh.shape)} text: {cond.description}", flush=True)

    mngr = checkpoints.manager(workdir, keep=int(config.train.keep_ckpts))
    steps = checkpoints.available_steps(workdir)
    if steps:
        restored, meta = checkpoints.restore(mngr, steps[-1], trainer.abstract_state, trainer.state_shardings)
        state = step_lib.TrainState(step=jnp.asarray(meta["step"], jnp.int32), nonfinite_step=jnp.asarray(-1, jnp.int32),
                                    **restored)
        state = jax.device_put(state, trainer.state_shardings)
        print(f"resumed from step {meta['step']} ({checkpoints.checkpoint_dir(workdir)})", flush=True)
    else:
        state = trainer.init(jax.random.PRNGKey(config.seed))
    start = int(jax.device_get(state.step))

    global_batch = int(config.train.batch_size)
    data = pipeline.make_iterator(config, global_batch=global_batch, process_index=jax.process_index(),
                                  process_count=jax.process_count(), start_step=start)
    rng = jax.random.PRNGKey(config.seed + 1)
    writer = MetricWriter(workdir)
    preempt = Preemption()
    compiled = None
    flops = 0.0
    peak = peak_flops(config)
    last_t, last_step = time.time(), start
    metrics_host = {}
    num_steps = int(config.train.num_steps)
    end = num_steps if not stop_after else min(num_steps, start + stop_after)

    def save(step):
        nf = int(jax.device_get(state.nonfinite_step))
        if nf >= 0:
            raise TrainingError(f"loss or gradient norm was NaN/Inf at step {nf}; stopping without "
                                f"checkpointing (the last good checkpoint is kept)")
        checkpoints.save(mngr, step, state, {"step": step, "data_position": step})

    try:
        for step in range(start, end):
            host = next(data)
            text, mask = cond(host["captions"])
            local = {"image": host["image"], "text": np.asarray(text, dtype=jnp.dtype(trainer.model_cfg.dtype)),
                     "text_mask": np.asarray(mask, bool)}
            if trainer.is_sr:
                local["lowres"] = host["lowres"]
            batch = parallel.host_local_batch_to_global(local, mesh)
            if compiled is None:
                compiled = trainer.step.lower(state, batch, rng).compile()
                if peak:
                    flops = step_lib.model_flops(config, global_batch) / jax.device_count()
            state, metrics = compiled(state, batch, rng)
            done = step + 1
            if done % config.train.log_every == 0 or done == end:
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
                writer.write(done, metrics_host)
                last_t, last_step = time.time(), done
            if config.train.sample_every and done % config.train.sample_every == 0:
                preview(trainer, state, cond, config, host, workdir, done)
            if done % config.train.ckpt_every == 0 or done == end or preempt.requested:
                save(done)
            if preempt.requested:
                print(f"preempted: checkpoint written at step {done}", flush=True)
                break
    finally:
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
    return metrics_host, state


