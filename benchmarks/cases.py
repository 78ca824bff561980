"""What each benchmark case builds, shared by both sides: this project's stage config (the source of
truth for model sizes) and the imagen-pytorch U-Net arguments that mirror it. Imports neither jax
nor torch."""
import importlib

# imagen-pytorch's Unet has one head count for every level: 8 heads of 64 (its BaseUnet64 /
# SRUnet256 defaults) are the closest to this project's channels/64 heads at the attention levels.
PEER_ATTN_HEADS = 8


def stage_config(stage, variant, text_len, *, optimizer=None, remat=None):
    """configs/<stage>.py:<variant> with the text length of the benchmark.

    optimizer: None keeps the config's; "adam" | "adafactor" sets it (both sides read it from
      here, so a row compares the same optimizer). remat: None keeps the config's; "on" | "off"."""
    c = importlib.import_module(f"configs.{stage}").get_config(variant)
    c.text.max_length = int(text_len)
    c.train.sample_every = 0
    if optimizer not in (None, "", "config"):
        if optimizer not in ("adam", "adafactor"):
            raise ValueError(f"optimizer must be config, adam or adafactor, got {optimizer!r}")
        c.optimizer.name = optimizer
    if remat not in (None, "", "config"):
        if remat not in ("on", "off"):
            raise ValueError(f"remat must be config, on or off, got {remat!r}")
        c.model.remat = remat == "on"
    return c


def spec_config(spec):
    """The stage config a benchmark job spec describes (the same on both sides)."""
    return stage_config(spec["stage"], spec["variant"], spec["text_len"],
                        optimizer=spec.get("optimizer"), remat=spec.get("remat"))


def peer_unet_kwargs(config):
    """imagen_pytorch.Unet(**kwargs) of the same width, depth and attention levels as `config`.

    Text: this project puts the text tokens into the self-attention keys/values at the attention
    levels (paper App. D.3.1); imagen-pytorch does that too (layer_attns_add_text_cond) and adds a
    cross-attention layer at the same levels (layer_cross_attns), as its BaseUnet64 does.
    """
    m = config.model
    attn_channels = [m.base_channels * k for k, a in zip(m.channel_mults, m.attn_levels) if a] or [m.base_channels]
    # channels / head_dim at the narrowest attention level, capped at 8 (tiny test models: 2-4).
    heads = max(2, min(PEER_ATTN_HEADS, min(attn_channels) // m.head_dim))
    return dict(
        dim=int(m.base_channels),
        dim_mults=tuple(int(x) for x in m.channel_mults),
        num_resnet_blocks=tuple(int(x) for x in m.num_res_blocks),
        layer_attns=tuple(bool(x) for x in m.attn_levels),
        layer_cross_attns=tuple(bool(x) for x in m.attn_levels),
        attn_dim_head=int(m.head_dim),
        attn_heads=heads,
        text_embed_dim=int(m.text_dim),
        lowres_cond=bool(m.get("lowres_cond", False)),
        memory_efficient=bool(m.get("efficient", False)),
    )


def image_sizes(config):
    """(output side, low-res side or 0)."""
    return int(config.data.image_size), int(config.diffusion.lowres_size)


def random_inputs(batch, size, lowres_size, text_len, text_dim, seed=0):
    """The same random training/sampling inputs for both sides, as NumPy (NHWC, float32):
    image [B, S, S, 3] in [-1, 1], lowres [B, s, s, 3] (SR stages only), text [B, L, D]
    (T5-like scale), text_mask [B, L] with prompt lengths drawn from [L/4, L]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {"image": rng.uniform(-1.0, 1.0, (batch, size, size, 3)).astype(np.float32)}
    if lowres_size:
        out["lowres"] = rng.uniform(-1.0, 1.0, (batch, lowres_size, lowres_size, 3)).astype(np.float32)
    out["text"] = (0.2 * rng.standard_normal((batch, text_len, text_dim), dtype=np.float32))
    lengths = rng.integers(max(text_len // 4, 1), text_len + 1, batch)
    out["text_mask"] = np.arange(text_len)[None, :] < lengths[:, None]
    return out


def random_images(n, size, seed=0):
    """uint8 [N, S, S, 3] for the FID feature extractors."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
