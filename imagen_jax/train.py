"""Trains one cascade stage (base64, sr256 or sr1024: the config decides).

    python -m imagen_jax.train --config=configs/base64.py:tiny --workdir=/tmp/base64 [--config.key=value ...]

Resumes automatically from the latest checkpoint in WORKDIR; SIGTERM checkpoints and exits 0.
See imagen_jax/training/loop.py for the loop and configs/*.py for what each stage expects.
"""

from absl import flags

from imagen_jax import cli
from imagen_jax.training import loop

FLAGS = flags.FLAGS
cli.define_config("config", "Stage config: configs/<stage>.py[:variant], or its name <stage>[:variant] "
                  "(e.g. base64:tiny; an installed package carries configs/).")
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and preview grids go here.")
flags.DEFINE_integer("stop_after", 0, "Stop (with a checkpoint) after this many steps of this run; 0 = no.")


def main(argv):
    del argv
    return cli.run(_main)


def _main():
    config = cli.config_flag()
    if FLAGS.workdir is None or config is None:
        raise cli.UsageError("--config and --workdir are required")
    cli.check_output(FLAGS.workdir, "--workdir")
    if FLAGS.stop_after < 0:
        raise cli.UsageError(f"--stop_after must be >= 0, got {FLAGS.stop_after}")
    loop.train(config, FLAGS.workdir, stop_after=FLAGS.stop_after)


def console_main():
    cli.console_main(main)


if __name__ == "__main__":
    console_main()
