"""Imagen super-resolution 256 -> 1024 Efficient U-Net (paper App. F.3): 458M parameters, no
self-attention, text cross-attention at the lowest level, linear noise schedule; trained on random
256x256 crops of the 1024 image with the matching 64x64 crops of the 256 input.

    python -m imagen_jax.train --config=configs/sr1024.py:tiny --workdir=/tmp/sr1024_tiny
    python -m imagen_jax.train --config=configs/sr1024.py --workdir=gs://BUCKET/sr1024
"""
from configs import common


def get_config(arg=None):
    variant = common.parse_arg(arg)
    c = common.stage_config()
    c.stage = "sr1024"
    c.data.image_size = 256          # crop size trained on (the model is fully convolutional)
    c.data.full_size = 1024
    c.diffusion.lowres_size = 256
    c.diffusion.schedule = "linear"
    c.optimizer.name = "adam"
    c.model.update(dict(
        image_size=256, base_channels=128, channel_mults=(1, 2, 4, 8), num_res_blocks=(2, 4, 8, 8),
        attn_levels=(False, False, False, False),
        cross_attn_levels=(False, False, False, True),  # explicit text cross-attention at the lowest level
        # Placement and width as SR256 (F.3: "the same as SR256 except no self-attention").
        efficient=True, lowres_cond=True, attn_every_block=False, attn_heads=8, head_dim=256,
        text_dim=4096, cond_dim=256, dtype="bfloat16", remat="auto", attention_impl="auto"))
    c.sampling.update(dict(steps=64, guidance=8.0, sampler="ddpm", aug_level=0.0))
    if variant == "small":
        c.model.update(dict(base_channels=64, num_res_blocks=(1, 2, 2, 2), head_dim=128, remat=False))
        c.train.batch_size = 64
    elif variant == "tiny":
        c.data.image_size = 32       # 32x32 crops of 256x256 images, from 64x64 inputs (after sr256:tiny)
        c.data.full_size = 256
        c.diffusion.lowres_size = 64
        c.model.update(dict(image_size=32, base_channels=16, channel_mults=(1, 2), num_res_blocks=(1, 1),
                            attn_levels=(False, False), cross_attn_levels=(False, True), attn_heads=2,
                            head_dim=32, text_dim=64, cond_dim=64, num_groups=8, dtype="float32", remat=False))
        c.train.update(dict(batch_size=8, num_steps=200, log_every=10, ckpt_every=100))
        c.optimizer.update(dict(warmup_steps=10, learning_rate=1e-3))
        c.sampling.update(dict(steps=8))
    return c
