"""Exports one stage's checkpoint as a self-contained inference bundle (safetensors parameters,
stage config, vocabulary, manifest with checksums; see imagen_jax/bundle.py for the layout).

    python -m imagen_jax.export --workdir /tmp/base64_tiny --out /tmp/base64_bundle
        [--step N] [--params ema|raw] [--dtype bfloat16|float32] [--overwrite] [--max_shard_bytes N]

prints `exported <count> params (ema, bfloat16) from step <step> to <out>: <size> in <n> file(s)`.
The bundle samples without its workdir: `python -m imagen_jax.sample --stages BUNDLE,... ...`.
Multi-host: run the same command on every host (as training does); the output path must be on a
file system that every host sees.
"""
import argparse
import sys

from imagen_jax import bundle, cli


def parse_args(argv):
    p = cli.ArgumentParser(prog="python -m imagen_jax.export", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="Training workdir (config.json + checkpoints/).")
    p.add_argument("--out", required=True, help="Bundle directory to create.")
    p.add_argument("--step", type=int, default=None, help="Checkpoint step (default: the latest).")
    p.add_argument("--params", choices=sorted(bundle.PARAM_KINDS), default="ema",
                   help="EMA parameters (default) or the raw training parameters.")
    p.add_argument("--dtype", choices=sorted(bundle.DTYPES), default="bfloat16",
                   help="Stored parameter dtype (default bfloat16: half the size).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing bundle at --out.")
    p.add_argument("--max_shard_bytes", type=int, default=bundle.DEFAULT_MAX_SHARD_BYTES,
                   help="Largest safetensors file (bytes of tensor data) before splitting into shards.")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    return p.parse_args(argv)


def main(argv=None):
    """Returns the exit status: 0, 1 on a bad workdir / step / output / bundle, 2 on bad flags."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse has printed its usage message
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
