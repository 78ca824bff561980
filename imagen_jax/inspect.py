"""Inspects a stage config without training: parameter counts, and (with --compile) the compiled
train step's memory and FLOPs on the local devices or on a TPU topology (libtpu on any machine).

    python -m imagen_jax.inspect --config=configs/base64.py
        per-module parameter counts and a final line `params=<integer>`
    python -m imagen_jax.inspect --config=configs/base64.py:tiny --compile
        compiles the train step for the local devices and prints per-device memory
    python -m imagen_jax.inspect --config=configs/pods.py:base64_v4_256 --topology=v4-256 --compile
        compiles for 128 TPU v4 chips and prints per-chip memory against HBM, FLOPs per step, an
        estimated step time and MFU, and `fits=<true|false> per_chip_bytes=<int> hbm_bytes=<int>`
"""
import math

from absl import flags

import flax.linen as nn
import jax

from imagen_jax import cli
from imagen_jax import training
from imagen_jax.models import param_shapes

FLAGS = flags.FLAGS
cli.define_config("config", "Stage config: configs/<stage>.py[:variant], or its name <stage>[:variant] "
                  "(e.g. pods:base64_v4_256).")
flags.DEFINE_bool("compile", False, "Lower and compile the train step and report its memory.")
flags.DEFINE_string("topology", None, "TPU accelerator type to compile for, e.g. v4-256 (needs libtpu).")
flags.DEFINE_integer("batch_size", 0, "Global batch for --compile (default: the config's train.batch_size).")
flags.DEFINE_float("mfu", 0.4, "Utilisation assumed for the estimated step time.")


def param_report(config):
    """Lines of 'module params' in tree order and the total."""
    shapes = nn.meta.unbox(param_shapes(training.model_config(config)))
    rows = [(name, sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(sub))) for name, sub in shapes.items()]
    return rows, sum(n for _, n in rows)


def human(n):
    return f"{n / 2**30:.2f} GiB"


def lower_if_sample_step(config, devices):
    """Lowers one classifier-free-guided IF sampling step (the U-Net on the doubled batch, then the
    guidance combination of the 3 eps channels) for `devices`, from abstract inputs, with the U-Net
    parameters sharded by the config's mesh rules. Returns (module, lowered)."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from imagen_jax import parallel
    from imagen_jax.models import deepfloyd_if

    dtype = jnp.dtype(config.dtype)
    module = deepfloyd_if.build_unet(config.unet.to_dict(), dtype, attention_impl=config.attention_impl)
    mesh = parallel.make_mesh(config.mesh, devices)
    boxed = deepfloyd_if.param_shapes(module)
    shardings = parallel.logical_shardings(boxed, mesh, config.mesh.rules)
    parallel.check_sharded(boxed, shardings, mesh, 1 << 20)
    params = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    nn.meta.unbox(boxed), shardings)
    cfg, batch = module.config, 2 * int(config.prompts)
    size = cfg.sample_size or 64
    data = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=parallel.batch_sharding(mesh, len(shape)))  # noqa: E731
    x = data((batch, size, size, cfg.in_channels), jnp.float32)
    text = data((batch, int(config.text_len), cfg.text_dim), dtype)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=NamedSharding(mesh, P()))
    noise_level = t if cfg.class_embed_type == "timestep" else None
    rules = parallel.rules_tuple(config.mesh.rules)

    def step(params, x, t, text, noise_level):
        with nn.logical_axis_rules(rules):  # the activations' logical constraints apply
            out = module.apply({"params": params}, x, t, text, noise_level)
        unc, cond = jnp.split(out, 2)
        return jnp.concatenate([unc[..., :3] + 7.0 * (cond[..., :3] - unc[..., :3]), cond[..., 3:]], -1)

    with jax.set_mesh(mesh):
        lowered = jax.jit(step, out_shardings=parallel.batch_sharding(mesh, 4)).lower(params, x, t, text, noise_level)
    return module, lowered


def inspect_if_sample(config):
    """Parameter count and (with --compile --topology) the fit of one guided IF sampling step."""
    from imagen_jax.models import deepfloyd_if

    module = deepfloyd_if.build_unet(config.unet.to_dict(), config.dtype)
    total = deepfloyd_if.count_params(deepfloyd_if.param_shapes(module))
    print(f"stage=if_sample total={total:,d}")
    print(f"params={total}")
    if not FLAGS.compile:
        return
    if not FLAGS.topology:
        raise cli.UsageError("an if_sample config compiles for a TPU topology: pass --topology")
    from imagen_jax import topology
    spec = topology.slice_spec(FLAGS.topology)
    devices = topology.topology_devices(FLAGS.topology)
    _, lowered = lower_if_sample_step(config, devices)
    compiled, rep = topology.compile_and_report(lowered, spec, FLAGS.mfu)
    mesh = {k: config.mesh[k] for k in ("data", "fsdp", "tensor")}
    print(f"topology={FLAGS.topology} chips={len(devices)} batch={2 * int(config.prompts)} "
          f"prompts={int(config.prompts)} dtype={config.dtype} mesh={mesh}")
    if compiled is not None:
        print_chip_memory(rep)
    if rep.get("flops"):
        print(f"flops per sampling step per chip: {rep['flops']:.4g}; estimated step time at {FLAGS.mfu:.0%} "
              f"MFU: {rep['est_step_time'] * 1e3:.1f} ms")
    print(topology.format_fits_line(rep))


def print_chip_memory(rep):
    print(f"per-chip memory: arguments {human(rep['argument_bytes'])}, temporaries "
          f"{human(rep['temp_bytes'])}, outputs {human(rep['output_bytes'])}, aliased "
          f"{human(rep['alias_bytes'])}, total {human(rep['per_chip_bytes'])} of HBM {human(rep['hbm_bytes'])}")


def main(argv):
    del argv
    return cli.run(_main)


def _main():
    config = cli.config_flag()
    if config is None:
        raise cli.UsageError("--config is required")
    if FLAGS.batch_size < 0:
        raise cli.UsageError(f"--batch_size must be >= 0 (0: the config's train.batch_size), got {FLAGS.batch_size}")
    if not 0.0 < FLAGS.mfu <= 1.0:
        raise cli.UsageError(f"--mfu must be in (0, 1], got {FLAGS.mfu}")
    if config.get("kind") == "if_sample":
        return inspect_if_sample(config)
    rows, total = param_report(config)
    for name, n in rows:
        print(f"{name:32s} {n:>15,d}")
    print(f"stage={config.stage} total={total:,d}")
    print(f"params={total}")
    if not FLAGS.compile:
        return
    batch = FLAGS.batch_size or int(config.train.batch_size)
    if FLAGS.topology:
        from imagen_jax import topology
        spec = topology.slice_spec(FLAGS.topology)
        devices = topology.topology_devices(FLAGS.topology)
        trainer, lowered = training.lower_train_step(config, devices, batch)
        compiled, rep = topology.compile_and_report(lowered, spec, FLAGS.mfu, trainer.microbatches)
        print(f"topology={FLAGS.topology} chips={len(devices)} batch={batch} "
              f"microbatches={trainer.microbatches} mesh={dict(config.mesh)}")
        if compiled is not None:
            print_chip_memory(rep)
        if rep.get("flops"):
            chip = topology.chip_spec(FLAGS.topology)
            print(f"flops per step per chip: {rep['flops']:.4g}; estimated step time at {FLAGS.mfu:.0%} MFU "
                  f"of {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s: {rep['est_step_time']:.3f}s "
                  f"({batch / rep['est_step_time']:.1f} images/s)")
        print(topology.format_fits_line(rep))
        return
    _, lowered = training.lower_train_step(config, jax.devices(), batch)
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    per_dev = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
               + mem.temp_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    print(f"devices={jax.device_count()} ({jax.devices()[0].device_kind}) batch={batch}")
    print(f"per-device memory: arguments {human(mem.argument_size_in_bytes)}, temporaries "
          f"{human(mem.temp_size_in_bytes)}, total {human(per_dev)}"
          + (f" of {human(limit)}" if limit else ""))
    print(f"flops per step per device: {float((cost or {}).get('flops', 0)):.4g}")
    print(f"per_device_bytes={int(per_dev)}" + (f" device_limit_bytes={int(limit)}" if limit else ""))


def console_main():
    cli.console_main(main)


if __name__ == "__main__":
    console_main()
