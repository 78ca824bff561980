"""The Imagen U-Nets: the base 64x64 U-Net (Imagen App. F.1) and the Efficient U-Net used by the
super-resolution stages (App. B.1, F.2, F.3), one module configured by `UNetConfig`.

Inputs: noisy image x_t [B, H, W, C], its log-SNR [B], text embeddings [B, L, D] with mask [B, L],
and for super-resolution the low-res image already resized to [B, H, W, C] with its
noise-augmentation log-SNR [B]. Output: the prediction (eps by default) [B, H, W, out_channels].
"""
import dataclasses
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.models import layers

REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    image_size: int = 64                  # side of the (square) training resolution
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 512              # channels = base_channels * channel_mults[level]
    channel_mults: Sequence[int] = (1, 2, 3, 4)
    num_res_blocks: Sequence[int] = (3, 3, 3, 3)  # per level
    attn_levels: Sequence[bool] = (False, True, True, True)  # self-attention (text in keys/values)
    cross_attn_levels: Sequence[bool] = (False, False, False, False)  # text-only cross-attention
    head_dim: int = 64
    attn_heads: int = 0                   # 0: channels // head_dim heads (attention width = channels)
    # Efficient U-Net: attention after every residual block, or once per DBlock/UBlock (the paper's
    # Figs. A.28/A.29; configs/sr256.py). The defaults here keep older checkpoints' layouts.
    attn_every_block: bool = True
    resample: str = "conv"                # base U-Net: "conv" (strided conv / nearest + conv) | "biggan" (paper)
    efficient: bool = False               # Efficient U-Net block order and skip scaling
    lowres_cond: bool = False             # super-resolution: concatenate the low-res image
    text_dim: int = 4096                  # width of the text encoder (T5-XXL: 4096)
    cond_dim: int = 0                     # conditioning embedding width; 0 = 4 * base_channels
    num_groups: int = 32
    dropout: float = 0.0
    dtype: str = "float32"                # compute dtype; params are always float32
    remat: bool = False                   # rematerialise each residual / attention block
    remat_policy: str = "nothing_saveable"
    attention_impl: str = "auto"          # "auto" | "xla" | "cudnn"

    def __post_init__(self):
        n = len(self.channel_mults)
        for name in ("num_res_blocks", "attn_levels", "cross_attn_levels"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} must have one entry per level ({n}), got {getattr(self, name)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")
        if self.resample not in ("conv", "biggan"):
            raise ValueError(f"resample must be conv or biggan, got {self.resample!r}")
        if self.attention_impl not in ("auto", "xla", "cudnn"):
            raise ValueError(f"attention_impl must be auto, xla or cudnn, got {self.attention_impl!r}")

    @property
    def total_downsampling(self):
        n = len(self.channel_mults)
        return 2 ** (n if self.efficient else n - 1)

    @classmethod
    def from_dict(cls, d):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown U-Net config keys {unknown}; known: {sorted(fields)}")
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**d)

    def to_dict(self):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


class UNet(nn.Module):
    config: UNetConfig

    def _block(self, cls):
        c = self.config
        if not c.remat:
            return cls
        return nn.remat(cls, policy=REMAT_POLICIES[c.remat_policy], static_argnums=(3,) if cls is layers.ResBlock else ())

    def check_inputs(self, x, lowres):
        c = self.config
        h, w = x.shape[1:3]
        if h % c.total_downsampling or w % c.total_downsampling:
            raise ValueError(f"image size {h}x{w} is not divisible by the U-Net's total downsampling "
                             f"{c.total_downsampling}")
        if c.lowres_cond and lowres is None:
            raise ValueError("this super-resolution U-Net needs the low-res image (lowres=...)")
        if lowres is not None and lowres.shape[1:3] != x.shape[1:3]:
            raise ValueError(f"lowres must be resized to the output size {x.shape[1:3]}, got {lowres.shape[1:3]}")

    @nn.compact
    def __call__(self, x, logsnr, text, text_mask, lowres=None, lowres_logsnr=None, train=False):
        c = self.config
        self.check_inputs(x, lowres)
        dtype = jnp.dtype(c.dtype)
        impl = layers.choose_attention_impl(c.attention_impl, dtype)
        cond_dim = c.cond_dim or 4 * c.base_channels
        res_block, attn_block = self._block(layers.ResBlock), self._block(layers.AttentionBlock)
        text = text.astype(dtype)

        # Conditioning: noise level (+ augmentation level) + pooled text.
        emb = layers.noise_level_features(logsnr, c.base_channels)
        emb = layers.dense(cond_dim, None, "mlp", name="time_1")(emb)
        emb = layers.dense(cond_dim, "mlp", "cond", name="time_2")(nn.silu(emb))
        if c.lowres_cond:
            aug = lowres_logsnr if lowres_logsnr is not None else jnp.full_like(logsnr, 20.0)
            a = layers.noise_level_features(aug, c.base_channels)
            a = layers.dense(cond_dim, None, "mlp", name="aug_1")(a)
            emb = emb + layers.dense(cond_dim, "mlp", "cond", name="aug_2")(nn.silu(a))
        emb = emb + layers.TextPooling(cond_dim, dtype=dtype, name="text_pool")(text, text_mask)
        emb = emb.astype(dtype)

        h = x.astype(dtype)
        if c.lowres_cond:
            h = jnp.concatenate([h, lowres.astype(dtype)], axis=-1)
        chans = [c.base_channels * m for m in c.channel_mults]
        h = layers.conv(chans[0] if not c.efficient else c.base_channels, dtype=dtype, name="conv_in")(h)

        def attend(h, level, tag):
            if c.attn_levels[level]:
                h = attn_block(c.head_dim, c.attn_heads, "self_text", c.num_groups, dtype, impl, name=f"{tag}_attn")(h, text, text_mask)
            if c.cross_attn_levels[level]:
                h = attn_block(c.head_dim, c.attn_heads, "cross", c.num_groups, dtype, impl, name=f"{tag}_xattn")(h, text, text_mask)
            return h

        skips = [h]
        n = len(chans)
        for lvl, ch in enumerate(chans):
            if c.efficient:  # Efficient U-Net: downsample first, then the blocks at the lower resolution.
                h = layers.downsample(h, ch, dtype, f"down{lvl}_pool")
            for j in range(c.num_res_blocks[lvl]):
                h = res_block(ch, c.num_groups, c.dropout, dtype, name=f"down{lvl}_res{j}")(h, emb, train)
                if not c.efficient or c.attn_every_block:
                    h = attend(h, lvl, f"down{lvl}_{j}")
                if not c.efficient:
                    skips.append(h)
            if c.efficient:
                if not c.attn_every_block:
                    h = attend(h, lvl, f"down{lvl}")
                skips.append(h)
            elif lvl < n - 1:
                if c.resample == "biggan":
                    h = res_block(ch, c.num_groups, c.dropout, dtype, resample="down", name=f"down{lvl}_pool")(h, emb, train)
                else:
                    h = layers.downsample(h, ch, dtype, f"down{lvl}_pool")
                skips.append(h)

        if not c.efficient:
            h = res_block(chans[-1], c.num_groups, c.dropout, dtype, name="mid_res0")(h, emb, train)
            h = attend(h, n - 1, "mid")
            h = res_block(chans[-1], c.num_groups, c.dropout, dtype, name="mid_res1")(h, emb, train)

        skip_scale = 1.0 / math.sqrt(2.0) if c.efficient else 1.0
        for lvl in reversed(range(n)):
            ch = chans[lvl]
            if c.efficient:
                # Additive skip scaled by 1/sqrt(2): the sum of two unit-variance signals stays unit
                # variance. The lowest level's skip is the very activation arriving from below (no
                # middle blocks in between), so adding it would only scale h by sqrt(2).
                skip = skips.pop()
                if lvl < n - 1:
                    h = (h + skip) * skip_scale
                for j in range(c.num_res_blocks[lvl]):
                    h = res_block(ch, c.num_groups, c.dropout, dtype, name=f"up{lvl}_res{j}")(h, emb, train)
                    if c.attn_every_block:
                        h = attend(h, lvl, f"up{lvl}_{j}")
                if not c.attn_every_block:
                    h = attend(h, lvl, f"up{lvl}")
                # Upsample after the blocks, to the next (higher-resolution) level's width.
                nxt = chans[lvl - 1] if lvl > 0 else c.base_channels
                h = layers.upsample(h, nxt, dtype, f"up{lvl}_upsample")
            else:
                for j in range(c.num_res_blocks[lvl] + 1):
                    h = jnp.concatenate([h, skips.pop()], axis=-1)
                    h = res_block(ch, c.num_groups, c.dropout, dtype, name=f"up{lvl}_res{j}")(h, emb, train)
                    h = attend(h, lvl, f"up{lvl}_{j}")
                if lvl > 0 and c.resample == "biggan":
                    h = res_block(ch, c.num_groups, c.dropout, dtype, resample="up", name=f"up{lvl}_upsample")(h, emb, train)
                elif lvl > 0:
                    h = layers.upsample(h, ch, dtype, f"up{lvl}_upsample")
        if c.efficient:
            h = (h + skips.pop()) * skip_scale
        h = nn.silu(layers.group_norm(c.num_groups, dtype, name="out_norm")(h))
        out = layers.conv(c.out_channels, dtype=dtype, zero=True, name="conv_out")(h)
        return out.astype(jnp.float32)


# The U-Net's dense layers that compute in float32 whatever config.dtype is (the noise-level MLPs).
FLOAT32_MODULES = ("time_1", "time_2", "aug_1", "aug_2")


def cast_kernels(config: UNetConfig, params):
    """params with every kernel that the U-Net casts to the compute dtype (all conv kernels, and the
    dense kernels outside FLOAT32_MODULES) already in that dtype; norms and biases stay float32.

    Each such layer casts its float32 kernel on every call, so casting once before a sampling loop
    gives bit-identical outputs and saves re-reading (and re-converting) the float32 kernels at
    every step: XLA does not hoist the loop-invariant converts out of the loop (profiled on an
    H200: a params-sized convert fusion per step, then ~1 ms a step of dense-kernel converts)."""
    dtype = jnp.dtype(config.dtype)
    if dtype == jnp.float32:
        return params

    def cast(path, p):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]  # skips a boxed leaf's .value
        if names and names[-1] == "kernel" and p.ndim >= 2 and p.dtype == jnp.float32 and not set(names) & set(FLOAT32_MODULES):
            return p.astype(dtype)
        return p

    return jax.tree_util.tree_map_with_path(cast, params)


def text_cache(model: "UNet", params, text, text_mask):
    """The U-Net's "text_cache" collection for these prompts: every projection of the text alone
    (each attention layer's text keys and values, the pooled text embedding). A sampler passes it
    back in ({"params": ..., "text_cache": ...}) at every step instead of recomputing them.

    Computed by one U-Net call at the smallest image size it takes: the cached values do not depend
    on the image, and the pixel path there costs ~(d / size)^2 of a sampling step."""
    c = model.config
    b, d = text.shape[0], c.total_downsampling
    kw = dict(x=jnp.zeros((b, d, d, c.in_channels), jnp.float32), logsnr=jnp.zeros((b,)), text=text,
              text_mask=text_mask)
    if c.lowres_cond:
        kw.update(lowres=jnp.zeros_like(kw["x"]), lowres_logsnr=jnp.zeros((b,)))
    _, state = model.apply({"params": params}, **kw, mutable=[layers.TEXT_CACHE])
    return state[layers.TEXT_CACHE]


def upsample_lowres(lowres, size):
    """Resizes the low-res conditioning image [B, h, w, C] to the stage's [B, size, size, C]."""
    b, _, _, ch = lowres.shape
    return jax.image.resize(lowres, (b, size, size, ch), method="bicubic").clip(-1.0, 1.0)


def init_inputs(config: UNetConfig, batch: int = 1, text_len: int = 8, image_size: Optional[int] = None):
    """Dummy inputs of the right shapes for `init` / `eval_shape`."""
    s = image_size or config.image_size
    x = jnp.zeros((batch, s, s, config.in_channels), jnp.float32)
    kw = dict(x=x, logsnr=jnp.zeros((batch,)), text=jnp.zeros((batch, text_len, config.text_dim)),
              text_mask=jnp.ones((batch, text_len), bool))
    if config.lowres_cond:
        kw.update(lowres=jnp.zeros_like(x), lowres_logsnr=jnp.zeros((batch,)))
    return kw


def param_shapes(config: UNetConfig):
    """Abstract (boxed, logically annotated) parameters, without allocating anything."""
    model = UNet(config)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **init_inputs(config)))["params"]


def count_params(tree):
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.meta.unbox(tree)))
