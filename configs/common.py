"""Fields shared by every stage's config. Stage files (base64.py, sr256.py, sr1024.py, demo.py)
start from `stage_config()` and override what differs; see each field's comment."""
import ml_collections

# Logical axis -> mesh axis rules for the U-Net (models/layers.py names) and the T5 encoder.
# FSDP shards every large weight along its input width; "tensor" splits attention heads and the
# conditioning MLPs. Activations are split over the batch on data x fsdp.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("height", None),
    ("width", None),
    ("channels", None),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("text_embed", "fsdp"),
    ("cond", "fsdp"),
    ("mlp", "tensor"),
    ("norm", None),
    ("vocab", "tensor"),
    ("kv", None),
    ("relpos_buckets", None),
)


def stage_config():
    c = ml_collections.ConfigDict()
    c.stage = "base64"              # base64 | sr256 | sr1024: which cascade stage this trains
    c.seed = 0

    # imagen_jax.models.UNetConfig fields. Not type-safe: model.remat is True | False | "auto"
    # ("auto": the trainer compiles the step per policy and keeps the cheapest that fits the
    # device; training/remat.py), so a variant may switch it between a bool and "auto".
    c.model = ml_collections.ConfigDict(type_safe=False)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"         # cosine | linear (SR1024 in the paper)
    c.diffusion.prediction = "eps"          # eps | v | x0
    c.diffusion.weighting = "none"          # none | min_snr | min_snr_plus1 | p2 (diffusion/losses.py)
    c.diffusion.min_snr_gamma = 5.0
    c.diffusion.cond_drop_prob = 0.1        # text dropped for classifier-free guidance
    c.diffusion.lowres_size = 0             # SR stages: side of the low-res conditioning image
    c.diffusion.noise_aug = True            # SR stages: noise-condition on a U(0, aug_max) augmentation level
    c.diffusion.aug_max = 1.0               # paper: 1.0; small models learn faster with a narrower range

    c.text = ml_collections.ConfigDict()
    c.text.t5_checkpoint = ""               # T5X dir / msgpack / safetensors; "" = tiny random T5
    c.text.vocab = ""                       # SentencePiece model of the T5 vocabulary
    c.text.max_length = 128
    c.text.embeddings_dir = ""              # precomputed embeddings (imagen_jax.encode_text); skips T5
    c.text.tiny_t5 = ml_collections.ConfigDict(dict(d_model=64, num_heads=4, head_dim=16, d_ff=128,
                                                    num_layers=2, vocab_size=512))

    c.data = ml_collections.ConfigDict()
    c.data.source = "shapes"                # shapes (embedded, no download) | tfds | tfrecord
    c.data.name = ""                        # tfds name, e.g. coco_captions
    c.data.data_dir = ""
    c.data.split = "train"
    c.data.files = ""                       # tfrecord glob
    c.data.image_key = "image"
    c.data.caption_key = "captions/text"
    c.data.image_size = 64                  # training resolution of the stage (crop size for SR1024)
    c.data.full_size = 0                    # SR1024: images are resized to this, then randomly cropped
    c.data.shuffle_buffer = 10_000
    c.data.prefetch = 2

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"               # adafactor (paper: base) | adam (paper: SR)
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 10_000
    c.optimizer.decay = "constant"          # constant | cosine (after warm-up)
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.clip_norm = 1.0
    c.optimizer.ema_decay = 0.9999

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                        # -1: the devices left over by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = DEFAULT_RULES
    c.mesh.min_shard_bytes = 1 << 20        # fsdp > 1: fail if a larger parameter stays replicated

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 2048               # global batch
    c.train.microbatches = 1                # gradient accumulation: the step runs the batch in this many slices
    c.train.num_steps = 2_500_000
    c.train.log_every = 100
    c.train.ckpt_every = 5000
    c.train.keep_ckpts = 3
    c.train.sample_every = 0                # preview grids from the EMA params; 0 = off
    c.train.sample_prompts = ("a red circle", "a blue square", "a green triangle", "a yellow star")
    c.train.peak_flops = 0.0                # per device; 0 = look it up from the device kind
    c.train.profile_steps = ""              # "a,b": jax.profiler trace of steps [a, b) in WORKDIR/profile
    c.train.compilation_cache = ""          # persistent XLA cache dir (local or gs://) so restarts skip compiling

    c.sampling = ml_collections.ConfigDict()
    c.sampling.sampler = "ddpm"
    c.sampling.steps = 256
    c.sampling.guidance = 1.35
    c.sampling.thresholding = "dynamic"
    c.sampling.percentile = 99.5
    c.sampling.aug_level = 0.0
    return c


def parse_arg(arg, default="paper"):
    """`paper`, `small` or `tiny`. Nothing else is understood: a field is changed with a
    `--config.<field>=value` flag (`:tiny,base_channels=64` is refused, not silently ignored)."""
    parts = (arg or default).split(",")
    variant = parts[0]
    if variant not in ("paper", "small", "tiny"):
        raise ValueError(f"config variant must be paper, small or tiny, got {variant!r}")
    if len(parts) > 1:
        extra = ",".join(parts[1:])
        raise ValueError(f"config argument {arg!r}: {extra!r} is not understood (the variant is one of "
                         f"paper, small, tiny); set fields with flags, e.g. --config.model.base_channels=64")
    return variant
