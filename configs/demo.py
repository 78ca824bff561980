"""The demo cascade: a tiny base stage (16x16) and a tiny super-resolution stage (16 -> 64), trained
on the embedded procedurally generated shapes dataset with a tiny randomly initialised frozen T5.

    python -m imagen_jax.demo --workdir=demo_out           (both stages, sampling and scoring)
    python -m imagen_jax.train --config=configs/demo.py:base --workdir=demo_out/base16
    python -m imagen_jax.train --config=configs/demo.py:sr --workdir=demo_out/sr64

Why 16 -> 64: a train step of the old 32x32 base cost 23 GFLOP at batch 16 (0.9 s under load here,
~7x an SR step); at 16x16 it is 12 GFLOP at batch 32 (0.37 s), while colour, background, position and
size are all decided at low resolution; the SR stage trains on 32x32 crops of 64x64 images (2.5 GFLOP a
step at batch 32, 0.1 s) and samples at 64x64.

Measured 2026-12-04 on the 2-core AMD EPYC (Zen 4, AVX-512), idle, README command 1 in a fresh clone
and fresh venv: demo 453 s (base 307 s incl. a 22 s compile, SR 119 s, sampling 27 s), colour 94%
(chance 14%), background 100% (33%), position 100% (20%), shape 19% (17%), speckle 4.4/255 on 16
held-out prompts; rerun in the same workdir 30 s; with XLA_FLAGS=--xla_cpu_max_isa=AVX2 429 s,
colour 81%, background 100%, position 81%, shape 25%, speckle 4.5/255. Training runs on one H200
(float32, 48 held-out prompts at 64x64): colour 100/92/100%, background 100% in all, position
100/60/83%, speckle 4.7/5.0/4.7 (seeds 0, 1, 2); seed 1's base retrained gave position 96% at
guidance 3 (94% at 2, 96% at 5 and 7, speckle at 16x16 1.9/2.6/3.9/5.2 for guidance 2/3/5/7), so the
spread is run to run (GPU reductions are not deterministic), not the seed. Earlier demos: 473 s on a
2-core EPYC without AVX-512 (2026-12-02, cosine base schedule, 600 SR steps, shared machine); 740 s
on a 2-core Intel Xeon with AVX-512 beside a CI run (2026-12-03).

Position is learnt late: with the plain v-loss below, 600 base steps gave position 25% (48 prompts
at 16x16, the base's mean x0 prediction at high noise in the prompt's region for 13-20% of prompts,
i.e. chance), 800 steps 52% (44% of 16 at 64x64, 407 s), 1000 steps 90%. The config before this
change (min_snr_plus1, 600 base steps; HEAD ad7e320, idle) took 363 s: colour 88%, background 100%,
position 25% (38% with the scorer's speckle-robust reading), shape 25%. Tried at 600 base steps and
dropped: two coordinate channels concatenated to the U-Net input (colour 46%, position 15-21% on 48
prompts at 16x16), the same plus learned position embeddings added before each attention layer
(colour 25%, position 19%); both learnt slower (loss 0.30-0.36 at step 100 vs 0.14).

Still unmet (issue 15): shape (reported only: at chance; the blobs are not recognisably shaped). It is
the base stage that does not learn shapes, not the 16x16 resolution or held-out pairs: the dataset's
own 16x16 renders, bicubic-upsampled to 64, score shape 83% (24x24: 94%), while the trained cascade
scores 28% on 32 training-distribution prompts (seen shape/colour pairs), and 2000 base steps instead
of 1000 gave shape 19% (colour 98%, background 100%, position 98%; 48 held-out prompts, this EPYC).
The speckle figures below are the older border measure (the 4-px border's mean absolute deviation),
not `shapes_score.background_noise`. The 16x16 base output has half the background speckle of before (border mean
absolute deviation 4.0/255 at 1000 steps, 4.9 at 600, vs 9.2/255 with min_snr_plus1; 48 prompts);
with 600 SR steps the 64x64 output carried fine-grained speckle from the SR stage (border MAD 12.4/255 at 64x64;
SR trained with the plain v-loss 14.7, 32 SR sampling steps 13.1, augmentation level 0 11.4, all
with the 600-step base). On 2026-12-03 (Intel Xeon, AVX-512, under load; 48 prompts, border 4 px): this SR stage 8.94/255; the same with `model.efficient=False` (res blocks at every resolution, no shallow full-resolution path) 6.23/255 and a lower loss (0.016 vs 0.023), but 4x the training time (660 s vs 166 s) and 1.8x the sampling time, too slow for the 10-minute budget. The SR stage given ground-truth 16x16 inputs keeps colour, background and
position at 100% of 64 prompts, shape 81%, in a GPU run of the same config. The base before (min_snr
weighting, dynamic thresholding, no cross-attention) gave colour 88%, background 62% (mostly gray),
position 25%, shape 19% in 561 s.
Point `text.t5_checkpoint` and `text.vocab` at a real T5X
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
        c.stage = "base64"  # the base stage, at 16x16 for the demo: colour, background, position, size
        c.data.image_size = 16
        c.model.update(dict(image_size=16, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=(1, 1, 1),
                            attn_levels=(False, True, True), cross_attn_levels=(False, True, True), **tiny))
        # Text cross-attention at 8x8 and 4x4 besides the self-attention with text keys: measured
        # (600 steps, 48 held-out prompts, guidance 3 static) colour 69% vs 46% without it.
        c.diffusion.prediction = "v"
        # The plain v-loss ("none"): x0-space weight snr + 1 (Salimans & Ho's "SNR+1"), so the noisiest
        # levels, where background and layout are decided, keep x0 weight >= 1 (min-SNR's min(snr, 5)
        # ~0 there: background 62%, mostly gray), and the low-noise levels keep v-weight 1. With
        # min_snr_plus1 (x0 weight min(snr + 1, 5), v-weight 5 / (snr + 1) -> 0 at low noise) the last
        # sampling steps never learnt to remove the remaining noise: coloured speckle in the 16x16
        # backgrounds, border mean absolute deviation 9.2/255 vs 4.9/255 with "none" (600 steps, 48
        # held-out prompts, 2026-12-02; colour 92% vs 83%, background 100% both, position 35% vs 25%,
        # i.e. at chance for both). 64 DDIM steps instead of 32 left it at 5.1 (the model, not the
        # sampler); guidance 1.5 instead of 3 gave 6.3 with min_snr_plus1 but colour 73%.
        c.diffusion.weighting = "none"
        c.train.batch_size = 32
        c.train.num_steps = 1000  # position: 25% at 600 steps, 52% at 800, 90% at 1000 (48 prompts)
        c.optimizer.learning_rate = 3e-3
        # Constant after warm-up, not cosine to 0: position is learnt late, and the cosine tail left
        # too little learning rate to finish it on some trajectories. Training seeds 0-3 on one H200
        # (float32, 48 held-out prompts at 16x16, base alone): position 98/83/94/77% constant vs
        # 92/38-42/79-88% cosine (seed 3 not run); colour 100/96/94/58% vs 98/65-77/100%.
        c.optimizer.decay = "constant"
        # Static thresholding: dynamic thresholding divides x0 by its 99.5th-percentile |value|, which
        # under guidance is a saturated shape colour, so white and black backgrounds were shrunk to
        # gray (background 67% at guidance 1, 61% at 3, 50% at 6 with min_snr; 100% vs 85% with this base).
        c.sampling.update(dict(sampler="ddim", steps=32, guidance=3.0, thresholding="static"))
    else:
        c.stage = "sr256"  # an SR stage, 16 -> 64 for the demo, trained on 32x32 crops
        c.data.image_size = 32
        c.data.full_size = 64
        c.diffusion.lowres_size = 16
        c.model.update(dict(image_size=32, base_channels=16, channel_mults=(1, 2, 4), num_res_blocks=(1, 1, 1),
                            attn_levels=(False, False, False), cross_attn_levels=(False, False, False),
                            efficient=True, lowres_cond=True, **tiny))
        c.diffusion.prediction = "v"
        c.diffusion.weighting = "min_snr"
        c.diffusion.aug_max = 0.3          # the augmentation levels that sampling uses (paper: 0 to 0.3)
        c.optimizer.learning_rate = 3e-3
        c.train.batch_size = 32
        # 1200 steps, not 600: the speckle left in the 64x64 backgrounds is an undertrained SR stage.
        # GPU sweep, 2026-12-04 (one H200, float32, the same 1000-step base, 48 held-out prompts,
        # `shapes_score.background_noise`, /255): 600 steps 8.5 (DDIM 32 steps 9.2, DDPM 32 7.7,
        # aug_level 0 7.4, 0.2 10.8), 1200 steps 4.7 (aug_level 0: 4.0; the 16x16 base input 2.4),
        # base_channels 24 at 600 steps 6.6, res blocks (1, 2, 2) 8.5, the plain v-loss 11.0; colour
        # 98-100%, background and position 100% in all. On the 2-core Zen 4 EPYC the SR stage took 74 s at
        # 600 steps and 119 s at 1200 (fresh-clone demo runs, 2026-12-04).
        c.train.num_steps = 1200
        c.sampling.update(dict(sampler="ddim", steps=16, guidance=1.0, aug_level=0.1))
    return c
