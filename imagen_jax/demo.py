"""The end-to-end demo (the README's main command): trains a tiny base stage and a tiny
super-resolution stage on the embedded shapes dataset, samples held-out prompts through the cascade,
and scores how often the generated image shows the prompt's colour, background, position and shape
(imagen_jax/evaluation/shapes_score.py).

    python -m imagen_jax.demo --workdir=demo_out

No weights can ship with the code, so the text encoder is a tiny RANDOMLY INITIALISED frozen T5 with
a SentencePiece vocabulary trained on the demo captions. Rerunning with the same workdir resumes.
"""
import os
import time

from absl import flags, logging

from imagen_jax import cli, conditioning, sampling, training
from imagen_jax.data import shapes

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "demo_out", "Where checkpoints, logs and images go.")
flags.DEFINE_integer("base_steps", 0, "Override the base stage's training steps (0: configs/demo.py).")
flags.DEFINE_integer("sr_steps", 0, "Override the SR stage's training steps (0: configs/demo.py).")
flags.DEFINE_integer("num_prompts", 16, "Held-out prompts to sample.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")


def run(workdir, *, base_steps=0, sr_steps=0, num_prompts=16, seed=0, log=print, quiet=True):
    """Trains (or resumes) both stages, samples and scores; returns the `shapes_score.Scores`.
    `quiet`: absl/orbax INFO lines off (a run would print dozens per checkpoint)."""
    from configs import demo as demo_config
    from imagen_jax.evaluation import shapes_score

    if quiet:
        logging.set_verbosity(logging.WARNING)
    t0 = time.time()
    log("imagen_jax demo: a tiny 2-stage cascade (16x16 base -> 64x64 SR) trained on procedurally generated "
        "captioned shapes.\nText encoder: a tiny RANDOMLY INITIALISED frozen T5 (no real T5 weights ship with "
        "the code); set text.t5_checkpoint and text.vocab in the config to use real T5.")
    vocab = conditioning.demo_vocab(os.path.join(workdir, "vocab", "shapes_spm"))
    stage_dirs = []
    for name, steps in (("base", base_steps), ("sr", sr_steps)):
        config = demo_config.get_config(name)
        config.text.vocab = vocab
        if steps:
            config.train.num_steps = steps
        stage_dir = os.path.join(workdir, "base16" if name == "base" else "sr64")
        log(f"\n== training the {name} stage ({config.train.num_steps} steps, batch {config.train.batch_size}) "
            f"in {stage_dir}")
        metrics, _ = training.train(config, stage_dir)
        done = f"final loss {metrics['loss']:.4f}" if "loss" in metrics else "already trained (resumed)"
        log(f"{name} stage done: {done} ({time.time() - t0:.0f}s since start)")
        stage_dirs.append(stage_dir)

    prompts = shapes.held_out_prompts(num_prompts)
    out = os.path.join(workdir, "samples")
    log(f"\n== sampling {len(prompts)} held-out prompts (shape/colour pairs never seen in training)")
    images = sampling.generate(stage_dirs, prompts, out, seed=seed, overwrite=True, log=log)
    scores = shapes_score.score(images, prompts)
    log(f"\ntext alignment on {len(prompts)} held-out prompts at {images.shape[1]}x{images.shape[2]}, read back "
        f"from the pixels (chance = guessing among the dataset's choices):")
    for line in scores.lines():
        log(line)
    log(f"\nimages: {os.path.join(out, 'images')}\ngrid: {os.path.join(out, 'grid.png')} (row-major, one per "
        f"prompt)\nprompts and settings: {os.path.join(out, 'settings.json')}\n"
        f"training curves: {os.path.join(workdir, 'base16', 'metrics.jsonl')}, "
        f"{os.path.join(workdir, 'sr64', 'metrics.jsonl')}\ntotal time: {time.time() - t0:.0f}s")
    return scores


def main(argv):
    del argv
    def _run():
        cli.check_output(FLAGS.workdir, "--workdir")
        for name in ("base_steps", "sr_steps", "seed"):
            if getattr(FLAGS, name) < 0:
                raise cli.UsageError(f"--{name} must be >= 0, got {getattr(FLAGS, name)}")
        if FLAGS.num_prompts < 1:
            raise cli.UsageError(f"--num_prompts must be >= 1, got {FLAGS.num_prompts}")
        run(FLAGS.workdir, base_steps=FLAGS.base_steps, sr_steps=FLAGS.sr_steps, num_prompts=FLAGS.num_prompts,
            seed=FLAGS.seed, quiet=not FLAGS["verbosity"].present)

    return cli.run(_run)


def console_main():
    cli.console_main(main)


if __name__ == "__main__":
    console_main()
