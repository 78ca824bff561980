"""Exports one stage's checkpoint as a self-contained inference bundle (safetensors parameters,
stage config, vocabulary, manifest with checksums; see imagen_jax/bundle.py for the layout).

    python -m imagen_jax.export --workdir /tmp/base64_tiny --out /tmp/base64_bundle
        [--step N] [--params ema|raw] [--dtype bfloat16|float32] [--overwrite] [--max_shard_bytes N]

prints `exported <count> params (ema, bfloat16) from step <step> to <out>: <size> in <n> file(s)`.
The bundle samples without its workdir: `python -m imagen_jax.sample --stages BUNDLE,... ...`.
Multi-host: run the same command on every host (as training does); the output path must be on a
file system that every host sees.
"""
import sys

from absl import flags

from imagen_jax import bundle, cli

# The tool's own FlagValues: main(argv) may run more than once in a process, beside other tools.
FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/) to export from.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Bundle directory to create (must not exist unless --overwrite).", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_enum("params", "ema", sorted(bundle.PARAM_KINDS), "EMA parameters (default) or the raw training "
                  "parameters.", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "bfloat16", sorted(bundle.DTYPES), "Stored parameter dtype (bfloat16: half the size "
                  "of float32).", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace an existing bundle at --out (only a bundle).", flag_values=FLAGS)
flags.DEFINE_integer("max_shard_bytes", bundle.DEFAULT_MAX_SHARD_BYTES, "Largest safetensors file (bytes of "
                     "tensor data) before the parameters are split into shards.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_bool("quiet", False, "No progress bar.", flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "out"], flag_values=FLAGS)


def main(argv=None):
    """argv: the flags (default sys.argv[1:]). Returns the exit status: 0, 1 on a bad workdir /
    step / output / bundle, 2 on bad flags."""
    try:
        args = cli.parse_own_flags(FLAGS, sys.argv[1:] if argv is None else argv, __doc__)
    except SystemExit as e:
        return int(e.code or 0)
    from imagen_jax import parallel

    def _run():
        cli.check_output(args.out, "--out")
        parallel.maybe_initialize_distributed()
        bundle.export(args.workdir, args.out, step=args.step, params=args.params, dtype=args.dtype,
                      overwrite=args.overwrite, max_shard_bytes=args.max_shard_bytes, progress=not args.quiet)

    # BundleError, CheckpointError, MeshError (1) or an unwritable --out (2): a message, not a traceback
    return cli.run(_run)


def console_main():
    sys.exit(main())


if __name__ == "__main__":
    console_main()
