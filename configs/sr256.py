"""Imagen super-resolution 64 -> 256 Efficient U-Net (paper App. B.1, F.2): 482M parameters
(README "Models": the paper layout; the paper states 600M).

    python -m imagen_jax.train --config=configs/sr256.py:tiny --workdir=/tmp/sr256_tiny
        tiny: 64x64 output from 16x16 inputs (chains after base64:tiny), seconds per step on a CPU.
    python -m imagen_jax.train --config=configs/sr256.py --workdir=gs://BUCKET/sr256
        paper: batch 2048, Adam, noise conditioning augmentation (128 TPU-v4 chips in the paper).
"""
from configs import common


def get_config(arg=None):
    variant = common.parse_arg(arg)
    c = common.stage_config()
    c.stage = "sr256"
    c.data.image_size = 256
    c.diffusion.lowres_size = 64
    c.optimizer.name = "adam"
    c.optimizer.decay = "cosine"    # F.2: warmup_cosine_decay_schedule(0 -> 1e-4, 10k, 2.5M steps)
    c.model.update(dict(
        image_size=256, base_channels=128, channel_mults=(1, 2, 4, 8), num_res_blocks=(2, 4, 8, 8),
        attn_levels=(False, False, False, True),      # self-attention + text only at the lowest level
        cross_attn_levels=(False, False, False, False),
        # One attention layer per DBlock/UBlock (Figs. A.28/A.29), 8 heads of width 2 x channels / 8.
        efficient=True, lowres_cond=True, attn_every_block=False, attn_heads=8, head_dim=256, text_dim=4096,
        cond_dim=512, dtype="bfloat16", remat="auto", attention_impl="auto"))
    c.sampling.update(dict(steps=128, guidance=8.0, sampler="ddpm", aug_level=0.0))
    if variant == "small":
        c.model.update(dict(base_channels=64, num_res_blocks=(1, 2, 2, 2), cond_dim=256, head_dim=128, remat=False))
        c.train.batch_size = 128
    elif variant == "tiny":
        c.data.image_size = 64
        c.diffusion.lowres_size = 16
        c.model.update(dict(image_size=64, base_channels=16, channel_mults=(1, 2), num_res_blocks=(1, 1),
                            attn_levels=(False, True), cross_attn_levels=(False, False), attn_heads=2, head_dim=32,
                            text_dim=64, cond_dim=64, num_groups=8, dtype="float32", remat=False))
        c.train.update(dict(batch_size=8, num_steps=200, log_every=10, ckpt_every=100))
        c.optimizer.update(dict(warmup_steps=10, learning_rate=1e-3, decay="constant"))
        c.sampling.update(dict(steps=8))
    return c
