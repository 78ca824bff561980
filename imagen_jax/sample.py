"""Generates images from prompts with a cascade of trained (or exported) stages.

    python -m imagen_jax.sample --prompt "a red circle" --stages WORKDIR_BASE[,WORKDIR_SR256[,WORKDIR_SR1024]] \\
        --out OUT [--num_images 4 --seed 0 --steps 256,128,64 --guidance 1.35,8,8 --sampler ddpm \\
        --percentile 99.5 --thresholding dynamic,dynamic,dynamic --aug_level 0,0]

Writes OUT/images/<prompt index>_<sample index>.png at the final stage's resolution, OUT/grid.png,
and OUT/settings.json with every setting and the seed (rerunning with them reproduces each image
bit for bit on the same device type). Output goes to OUT.partial first and is renamed at the end.
"""

from absl import flags

from imagen_jax import cli, parallel, sampling

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
flags.DEFINE_string("stages", None, "Comma-separated stage directories (workdirs, bundles or DeepFloyd IF "
                    "diffusers pipeline directories), base first.")
flags.DEFINE_string("out", None, "Output directory (must not exist unless --overwrite).")
flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
flags.DEFINE_integer("num_images", 1, "Images per prompt.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("batch_size", 0, "Images per sampling batch, over all devices (rounded up to a multiple of the "
                     "data-parallel device count; 0: up to 64).")
flags.DEFINE_string("steps", None, "Steps per stage, comma-separated (default: each stage's config).")
flags.DEFINE_string("guidance", None, "Guidance weight per stage (default: each stage's config).")
flags.DEFINE_string("sampler", None, "ddpm | ddim, one for all stages or one per stage.")
flags.DEFINE_float("eta", 0.0, "DDIM eta.")
flags.DEFINE_string("thresholding", None, "none | static | dynamic, one or one per stage (default: each stage's "
                    "config, sampling.thresholding).")
flags.DEFINE_float("percentile", None, "Dynamic-thresholding percentile (0, 100], for every stage (default: each "
                   "stage's config, sampling.percentile).")
flags.DEFINE_string("aug_level", None, "Noise-augmentation level of each SR stage, in [0, 1] (default: each "
                    "stage's config, sampling.aug_level).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Precision: DeepFloyd IF stages' weights and "
                  "compute (default float32); Imagen stages' compute (default: their config's model.dtype; "
                  "their parameters stay float32).")
flags.DEFINE_string("noise_level", None, "DeepFloyd IF stage II: integer noise-augmentation timestep (default 250).")
flags.DEFINE_string("t5", None, "T5 checkpoint that encodes prompts missing from a stage's embedding store "
                    "(text.embeddings_dir); default: the stage config's text.t5_checkpoint.")
flags.DEFINE_bool("accept_license", False, "Acknowledge the DeepFloyd IF License (non-commercial research only); "
                  "required to load IF stages (diffusers pipeline directories).")


def main(argv):
    del argv
    return cli.run(_main)


def _main():
    if not FLAGS.stages or not FLAGS.out:
        raise sampling.UsageError("--stages and --out are required")
    prompts = sampling.read_prompts(FLAGS.prompt, FLAGS.prompts_file)
    parallel.maybe_initialize_distributed()  # on a pod (launch/tpu.sh), before jax is first used
    sampling.generate([d for d in FLAGS.stages.split(",") if d], prompts, FLAGS.out,
                      num_images=FLAGS.num_images, seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                      overwrite=FLAGS.overwrite, steps=FLAGS.steps, guidance=FLAGS.guidance,
                      sampler=FLAGS.sampler, eta=FLAGS.eta, thresholding=FLAGS.thresholding,
                      percentile=FLAGS.percentile, aug_level=FLAGS.aug_level, noise_level=FLAGS.noise_level,
                      accept_license=FLAGS.accept_license, dtype=FLAGS.dtype, t5=FLAGS.t5)


def console_main():
    cli.console_main(main)


if __name__ == "__main__":
    console_main()
