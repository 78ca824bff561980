"""The paper's training runs on Cloud TPU pods: each stage's `paper` config with the mesh, batch and
rematerialisation that fit the pod. Check a configuration before renting the pod:

    python -m imagen_jax.inspect --config=configs/pods.py:base64_v4_256 --topology=v4-256 --compile
    python -m imagen_jax.inspect --config=configs/pods.py:base64_v5e_256 --topology=v5litepod-256 --compile
    python -m imagen_jax.inspect --config=configs/pods.py:sr256_v4_128 --topology=v4-128 --compile
    python -m imagen_jax.inspect --config=configs/pods.py:sr1024_v4_128 --topology=v4-128 --compile
    python -m imagen_jax.inspect --config=configs/pods.py:if_xl_sample_v5e_8 --topology=v5litepod-8 --compile

Each prints `fits=true per_chip_bytes=... hbm_bytes=...` (measured numbers are in the README), and
launches with launch/tpu.sh, e.g.
    launch/tpu.sh run --name imagen --zone us-central2-b --accelerator v4-256 --workdir gs://BUCKET/base64 \\
        -- train --config=configs/pods.py:base64_v4_256
"""
import importlib

# name: (stage config module, accelerator type, mesh fsdp size, global batch, microbatches)
# Gradient accumulation keeps each chip's slice of a microbatch at 2 (base) or 4 (SR) images: the
# activations of the whole per-chip batch (16 or 32 images) need not be live at once, and the TPU
# compiler's time and host memory, which grow with those activations (the base step at 4 images a
# chip: 10 min and 18 GB of host RAM on 2 CPU cores), stay within a CI machine.
PODS = {
    "base64_v4_256": ("base64", "v4-256", 8, 2048, 8),          # 128 chips: data 16 x fsdp 8
    "base64_v5e_256": ("base64", "v5litepod-256", 16, 2048, 4),  # 256 chips, 16 GiB each: data 16 x fsdp 16
    "sr256_v4_128": ("sr256", "v4-128", 4, 2048, 8),            # 64 chips: data 16 x fsdp 4
    "sr1024_v4_128": ("sr1024", "v4-128", 4, 2048, 8),          # 64 chips: data 16 x fsdp 4
}

# Sampling configurations (kind "if_sample"): name: (U-Net config in models/deepfloyd_if.py,
# accelerator type, mesh fsdp size, prompts per step). inspect compiles one guided sampling step: the
# U-Net on the doubled (uncond + cond) batch and the guidance combination, the whole network FSDP-sharded.
SAMPLING = {
    # IF-I-XL (4.3B, 8.6 GB in bf16) over 8 chips of 16 GiB: ~1.1 GB of weights a chip; 16 prompts
    # = a U-Net batch of 32 at 64x64, 4 images a chip.
    "if_xl_sample_v5e_8": ("IF_I_XL", "v5litepod-8", 8, 16),
}


def sampling_config(arg):
    import ml_collections

    from configs import common
    from imagen_jax.models import deepfloyd_if

    unet, accelerator, fsdp, prompts = SAMPLING[arg]
    c = ml_collections.ConfigDict()
    c.kind = "if_sample"                   # inspect compiles a guided U-Net step, not a train step
    c.unet = dict(getattr(deepfloyd_if, unet))  # a diffusers UNet2DConditionModel config.json
    c.dtype = "bfloat16"                   # parameters and compute
    c.attention_impl = "xla"               # the TPU path
    c.prompts = prompts                    # the U-Net batch is 2 x prompts (classifier-free guidance)
    c.text_len = 77
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=fsdp, tensor=1, rules=common.DEFAULT_RULES))
    c.accelerator = accelerator
    return c


def get_config(arg=None):
    if arg in SAMPLING:
        return sampling_config(arg)
    if arg not in PODS:
        raise ValueError(f"pod config must be one of {sorted(PODS) + sorted(SAMPLING)}, got {arg!r}")
    stage, accelerator, fsdp, batch, microbatches = PODS[arg]
    c = importlib.import_module(f"configs.{stage}").get_config("paper")
    c.mesh.data = -1
    c.mesh.fsdp = fsdp
    c.mesh.tensor = 1
    c.train.batch_size = batch
    c.train.microbatches = microbatches
    c.model.remat = True
    c.model.attention_impl = "xla"  # the TPU path (splash attention is chosen by XLA's TPU backend)
    c.unlock()
    c.accelerator = accelerator  # the TPU type this config was checked on
    return c
