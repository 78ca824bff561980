"""Zero-shot FID (and CLIP score) of a cascade on COCO 2014 validation captions.

    python -m imagen_jax.evaluate_fid --stages BASE64_DIR,SR256_DIR \\
        --inception pt_inception-2015-12-05-6726825d.pth --coco tfds --workdir EVAL_DIR \\
        [--num_samples 30000 --guidance 1.35,8 --steps 256,128 --sampler ddpm --seed 0] \\
        [--sweep 1,1.25,1.5,2,3,4,5,6,7,8,9,10 --sweep_samples 10000] \\
        [--shard_size 1000 --batch_size 0 --save_images --reference_count N --resolution 256] \\
        [--clip CLIP_DIR] [--cache_dir DIR] [--reference_stats STATS.npz] [--distinct_images]
    python -m imagen_jax.evaluate_fid --images FOLDER --inception ... (--coco ... | --reference_stats ...) \
        --workdir EVAL_DIR          # a folder of images, no model

--coco: 'tfds' (TFDS coco_captions, all val2014 images), 'tfds:NAME', or a directory with
captions_val2014.json and val2014/. --inception: pytorch-fid's FID Inception weights
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth).
--clip: a Hugging Face CLIP directory (e.g. openai/clip-vit-large-patch14); without it the
CLIP score is skipped. Every path above (stages, weights, COCO directory, EVAL_DIR, caches,
statistics, image folder, CLIP) may be local or gs:// (imagen_jax/paths.py).

Writes EVAL_DIR/fid.json (FID, KID, CLIP score, every setting and seed, software versions) and, with
--sweep, EVAL_DIR/sweep.{json,md,png,svg} (FID per base-stage guidance weight on --sweep_samples
captions). Rerunning the same command resumes an interrupted run: finished shards are kept. The
protocol and the EVAL_DIR layout are described in imagen_jax/evaluation/protocol.py.
Prints `FID <value> on <N> samples` at the end; exit status 1 with `error: ...` on bad input,
2 on bad flags.
"""
import os
import sys
import types

from absl import flags

from imagen_jax import cli, paths

TFDS_DEFAULT = "tfds:coco_captions"

# The tool's own FlagValues: main(argv) may run more than once in a process, beside other tools.
FLAGS = flags.FlagValues()
_F = dict(flag_values=FLAGS)
flags.DEFINE_string("stages", None, "Comma-separated stage directories (workdirs, bundles or DeepFloyd IF diffusers "
                    "pipeline directories), base first.", **_F)
flags.DEFINE_string("images", None, "Instead of --stages: a folder of images (.png/.jpg) to score, no model.", **_F)
flags.DEFINE_string("inception", None, "pytorch-fid's FID Inception weights (.pth) or a converted .npz.", **_F)
flags.DEFINE_string("inception_sha256", None, "Accept Inception weights with this SHA-256 ('any': every file; "
                    "default: pytorch-fid's release file only).", **_F)
flags.DEFINE_string("coco", None, "'tfds', 'tfds:NAME' or a COCO directory (captions_val2014.json + val2014/); "
                    "needed unless --images with --reference_stats.", **_F)
flags.DEFINE_string("reference_stats", None, "Precomputed reference statistics (.npz with mu, sigma: pytorch-fid "
                    "--save-stats, clean-fid) instead of computing them from --coco (no KID then).", **_F)
flags.DEFINE_bool("distinct_images", False, "Captions of num_samples distinct COCO images (one each), not "
                  "num_samples captions.", **_F)
flags.DEFINE_string("workdir", None, "Output directory EVAL_DIR (created; resumed if present).", **_F)
flags.DEFINE_integer("num_samples", 30000, "Captions (one image each) of the main run; 0: sweep only.",
                     lower_bound=0, **_F)
flags.DEFINE_integer("caption_seed", 0, "Seed of the caption draw (and of --reference_count's subset).", **_F)
flags.DEFINE_integer("seed", 0, "Sampling seed.", **_F)
flags.DEFINE_string("steps", None, "Steps per stage, comma-separated (default: each stage's config).", **_F)
flags.DEFINE_string("guidance", None, "Guidance weight per stage (default: each stage's config).", **_F)
flags.DEFINE_string("sampler", None, "ddpm | ddim, one for all stages or one per stage.", **_F)
flags.DEFINE_float("eta", 0.0, "DDIM eta.", **_F)
flags.DEFINE_string("thresholding", None, "none | static | dynamic, one or one per stage (default: each stage's "
                    "config).", **_F)
flags.DEFINE_float("percentile", None, "Dynamic-thresholding percentile, for every stage (default: each stage's "
                   "config).", **_F)
flags.DEFINE_string("aug_level", None, "Noise-augmentation level per SR stage, in [0, 1] (default: each stage's "
                    "config).", **_F)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "DeepFloyd IF stages' weights and compute "
                  "(default float32); Imagen stages' compute (default: their config's model.dtype).", **_F)
flags.DEFINE_string("noise_level", None, "DeepFloyd IF stage II: integer noise-augmentation timestep (default 250).",
                    **_F)
flags.DEFINE_string("t5", None, "T5 checkpoint that encodes captions missing from a stage's embedding store "
                    "(text.embeddings_dir); default: the stage config's text.t5_checkpoint.", **_F)
flags.DEFINE_bool("accept_license", False, "Acknowledge the DeepFloyd IF License (non-commercial research only); "
                  "needed for IF stages.", **_F)
flags.DEFINE_integer("batch_size", 0, "Images per sampling batch, over all devices (0: up to 64; rounded up to a "
                     "multiple of the devices).", **_F)
flags.DEFINE_integer("shard_size", 1000, "Images per resumable shard.", **_F)
flags.DEFINE_integer("inception_batch", 50, "Images per Inception batch.", **_F)
flags.DEFINE_integer("resolution", 256, "Side of the compared images (samples are resized to it).", **_F)
flags.DEFINE_integer("reference_count", None, "Reference images (default: all of val2014).", **_F)
flags.DEFINE_bool("save_images", False, "Also write every sample as a PNG.", **_F)
flags.DEFINE_string("cache_dir", None, "Reference statistics / converted weights cache (default EVAL_DIR/cache).",
                    **_F)
flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir for --coco tfds.", **_F)
flags.DEFINE_list("sweep", None, "Base-stage guidance weights to sweep, comma-separated.", **_F)
flags.DEFINE_integer("sweep_samples", 10000, "Captions per guidance weight of the sweep.", **_F)
flags.DEFINE_string("clip", None, "Hugging Face CLIP directory for the CLIP score (optional; local or gs://).", **_F)
flags.DEFINE_string("clip_device", "auto", "torch device of the CLIP model (auto: cuda if available).", **_F)
flags.DEFINE_integer("clip_batch", 32, "Images per CLIP batch.", lower_bound=1, **_F)
flags.DEFINE_bool("quiet", False, "No progress bar.", **_F)
flags.mark_flags_as_required(["inception", "workdir"], flag_values=FLAGS)


def parse_args(argv):
    """The flags as a namespace; SystemExit(2) with one line on a bad flag, SystemExit(0) after --help."""
    args = types.SimpleNamespace(**cli.parse_own_flags(FLAGS, argv, __doc__).flag_values_dict())

    def error(message):
        print(f"evaluate_fid: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)

    if args.sweep is not None:
        try:
            args.sweep = [float(v) for v in args.sweep if v.strip()]
        except ValueError:
            error(f"--sweep: expected comma-separated numbers, got {','.join(args.sweep)!r}")
    if (args.stages is None) == (args.images is None):
        error("give --stages (a cascade to sample) or --images (a folder of images), not both or neither")
    if args.coco is None and not (args.images and args.reference_stats):
        error("--coco is required (captions and reference images), unless --images with --reference_stats")
    if args.images is None and args.num_samples == 0 and not args.sweep:
        error("--num_samples 0 needs --sweep (nothing to evaluate)")
    if args.sweep and args.sweep_samples < 2:
        error("--sweep_samples must be >= 2")
    return args


def run(args, log=print):
    """Loads everything (cheap checks first), evaluates; returns {'fid': record, 'sweep': record}."""
    import jax

    from imagen_jax import cascade, parallel
    from imagen_jax.evaluation import inception, protocol
    from imagen_jax.sampling import StageConditioner, settings_for

    parallel.maybe_initialize_distributed()  # on a pod (launch/tpu.sh), before jax is first used
    coco_source = TFDS_DEFAULT if args.coco == "tfds" else (args.coco or "none")
    proto = protocol.Protocol(reference_stats=args.reference_stats, distinct_images=args.distinct_images,
        coco=coco_source, num_samples=args.num_samples, caption_seed=args.caption_seed, seed=args.seed,
        shard_size=args.shard_size, batch_size=args.batch_size, resolution=args.resolution,
        reference_count=args.reference_count, inception_batch=args.inception_batch,
        save_images=args.save_images, tfds_data_dir=args.tfds_data_dir)
    if args.coco is not None and not coco_source.startswith("tfds:") and not paths.isdir(coco_source):
        raise protocol.ProtocolError(f"--coco {coco_source!r} is not a directory (nor 'tfds' / 'tfds:NAME')")
    cache_dir = paths.absolute(args.cache_dir or paths.join(args.workdir, "cache"))

    # Cheap failures first: weights, stage directories and their order, settings.
    if not paths.isfile(args.inception):
        raise protocol.ProtocolError(f"FID Inception weights not found at {args.inception!r}; expected pytorch-fid's "
                                     f"{inception.WEIGHTS_FILENAME} (download it from {inception.WEIGHTS_URL})")
    weights_sha256 = inception.check_sha256(args.inception, args.inception_sha256 or inception.WEIGHTS_SHA256)
    params = inception.load(args.inception, cache_path=os.path.join(cache_dir, "fid_inception.npz"))
    # Each host's own devices: on a pod the hosts share the shards out, not one global batch.
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices())
    if args.images is not None:  # a folder of images: no model, no captions
        evaluator = protocol.Evaluator(args.workdir, proto, samplers=[], cond=None, inception_params=params,
                                       mesh=mesh, cache_dir=cache_dir, progress=not args.quiet, log=log)
        return {"fid": evaluator.evaluate_folder(args.images, {
            "inception_weights": paths.absolute(args.inception), "inception_sha256": weights_sha256,
            "command": "python -m imagen_jax.evaluate_fid " + " ".join(args.argv)}), "sweep": None}
    stage_dirs = [d for d in args.stages.split(",") if d.strip()]
    stages = [cascade.load_stage(d, mesh, accept_license=args.accept_license, dtype=getattr(args, "dtype", None))
              for d in stage_dirs]
    cascade.check_chain(stages)
    settings = settings_for(stages, steps=args.steps, guidance=args.guidance, sampler=args.sampler, eta=args.eta,
                            thresholding=args.thresholding, percentile=args.percentile, aug_level=args.aug_level,
                            noise_level=args.noise_level)
    clip = None
    if args.clip:
        clip = protocol.ClipScorer(args.clip, device=args.clip_device, batch_size=args.clip_batch)
        log(f"CLIP score: {args.clip} on {clip.device}")
    else:
        log("CLIP score: skipped (pass --clip with a local Hugging Face CLIP directory to compute it)")
    cond = StageConditioner(stages, t5=args.t5)  # each stage's text convention (Imagen T5X, or IF's HF T5)
    samplers = [cascade.make_sampler(st, mesh, s, cond.negative) for st, s in zip(stages, settings)]
    log(f"text encoder: {cond.description}; {jax.device_count()} {jax.devices()[0].device_kind} devices")

    evaluator = protocol.Evaluator(args.workdir, proto, samplers=samplers, cond=cond, inception_params=params,
                                   mesh=mesh, clip=clip, cache_dir=cache_dir, progress=not args.quiet, log=log)
    if evaluator.primary:  # the reference statistics are process 0's alone on a pod
        evaluator.reference()  # a short or broken COCO source fails here, before any sampling
    extra = {"text_encoder": cond.description, "inception_weights": paths.absolute(args.inception),
             "inception_sha256": weights_sha256,
             "command": "python -m imagen_jax.evaluate_fid " + " ".join(args.argv)}
    if any(getattr(st, "family", "imagen") == "deepfloyd_if" for st in stages):
        from imagen_jax import deepfloyd
        extra["license"] = deepfloyd.ATTRIBUTION
    out = {"fid": None, "sweep": None}
    if args.num_samples:
        out["fid"] = evaluator.evaluate(extra)
    if args.sweep:
        out["sweep"] = evaluator.sweep(args.sweep, args.sweep_samples, extra)
    return out


def main(argv=None):
    """Returns the exit status: 0, 1 on bad input (weights, stages, COCO source, settings), 2 on bad flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:  # the flags' one-line error or --help has been printed
        return int(e.code or 0)
    args.argv = argv

    def _run():
        # A gs:// output's bucket and credentials are checked before anything is read or written.
        for out in (args.workdir, args.cache_dir):
            if out:
                paths.check_bucket(out)
        check_workdir(args.workdir)
        run(args)

    # ProtocolError, CascadeError, CheckpointError (1), a bad --workdir (2)
    return cli.run(_run)


def check_workdir(workdir):
    """--workdir must be creatable, and an existing non-empty one must be an earlier evaluation
    (captions.json, samples/, cache/, sweep/ or fid.json): resuming writes into it, so it is never a training workdir or a bundle."""
    cli.check_output(workdir, "--workdir")
    d = paths.path(workdir)
    if not d.is_dir() or not any(d.iterdir()):
        return
    if any((d / n).exists() for n in ("config.json", "info.json", "checkpoints")) or not any(
            (d / n).exists() for n in ("captions.json", "fid.json", "cache", "samples", "sweep")):
        raise cli.UsageError(f"--workdir {workdir} exists and is not an earlier evaluation (no captions.json, samples/ or fid.json); "
                             "give a new or empty directory")


def console_main():
    sys.exit(main())


if __name__ == "__main__":
    console_main()
