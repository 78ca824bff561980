"""Imagen base 64x64 text-to-image U-Net (paper App. F.1): 2B parameters at `paper` size.

    python -m imagen_jax.train --config=configs/base64.py:tiny --workdir=/tmp/base64_tiny
        tiny: 16x16, 2 levels of 32 channels, a CPU runs a step in about a second; loss falls from
        ~1.0 within the first hundred steps on the embedded shapes dataset.
    python -m imagen_jax.train --config=configs/base64.py --workdir=gs://BUCKET/base64
        paper: 2.28B parameters (README "Models"), batch 2048, Adafactor, 2.5M steps (256 TPU-v4 chips in the paper;
        see configs/pods.py for the pod variants and `imagen_jax.inspect --topology` to check fit).
        It needs real data and T5 (the defaults are the embedded shapes and a tiny random T5); a paper run
        (README "Training on a pod"):
            --config.data.source=tfds --config.data.name=coco_captions --config.data.data_dir=gs://BUCKET/tfds
            --config.text.t5_checkpoint=gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000
            --config.text.vocab=gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model
            --config.train.compilation_cache=gs://BUCKET/jax_cache
        (or --config.text.embeddings_dir=gs://BUCKET/coco_t5xxl, written by imagen_jax.encode_text).
"""
from configs import common


def get_config(arg=None):
    variant = common.parse_arg(arg)
    c = common.stage_config()
    c.stage = "base64"
    c.data.image_size = 64
    c.optimizer.name = "adafactor"
    c.optimizer.decay = "cosine"    # F.1: warmup_cosine_decay_schedule(0 -> 1e-4, 10k, 2.5M steps)
    c.model.update(dict(
        image_size=64, base_channels=512, channel_mults=(1, 2, 3, 4), num_res_blocks=(3, 3, 3, 3),
        attn_levels=(False, True, True, True),        # self-attention (+ text) at 32, 16 and 8
        cross_attn_levels=(False, False, False, False),
        resample="biggan",                            # F.1 res_block_type: biggan (ADM resblock_updown)
        head_dim=64, text_dim=4096, cond_dim=1024, dtype="bfloat16", remat="auto",
        attention_impl="auto"))
    c.sampling.update(dict(steps=256, guidance=1.35, sampler="ddpm"))
    if variant == "small":
        c.model.update(dict(base_channels=128, num_res_blocks=(2, 2, 2, 2), cond_dim=512, remat=False))
        c.train.batch_size = 256
    elif variant == "tiny":
        c.data.image_size = 16
        c.model.update(dict(image_size=16, base_channels=32, channel_mults=(1, 2), num_res_blocks=(1, 1),
                            attn_levels=(False, True), cross_attn_levels=(False, False),
                            head_dim=16, text_dim=64, cond_dim=64, num_groups=8, dtype="float32",
                            remat=False))
        c.train.update(dict(batch_size=8, num_steps=200, log_every=10, ckpt_every=100))
        # Adam: the paper's Adafactor scales each update by RMS(param) (1e-3 for zero-initialised
        # layers), too slow for a 200-step run.
        c.optimizer.update(dict(name="adam", warmup_steps=10, learning_rate=1e-3, decay="constant"))
        c.sampling.update(dict(steps=16))
    return c
