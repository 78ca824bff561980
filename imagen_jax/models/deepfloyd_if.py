"""The DeepFloyd IF U-Net: a Flax module built from a diffusers `UNet2DConditionModel` config.json of
the IF block family, and a loader for its diffusers-format safetensors weights.

    module, params = load_unet("IF-I-XL-v1.0/unet", dtype=jnp.bfloat16)
    out = module.apply({"params": params}, x, t, text_states, noise_level=None)

x [B, H, W, in_channels] (NHWC), t [B] integer DDPM timesteps (0..999), text_states [B, L, encoder_hid_dim]
(raw T5 hidden states, all L rows), noise_level [B] integer (stage II's class label) ->
[B, H, W, out_channels] float32 (IF: 3 eps channels then 3 learned-range variance channels).

The parameter tree mirrors diffusers' module tree (`down_blocks.0.resnets.1.conv1.weight` is
params["down_blocks_0"]["resnets_1"]["conv1"]["kernel"]), so conversion is a fixed re-layout. Every
config key is read with diffusers' own __init__ default when absent (four of them differ from IF's
values: act_fn, resnet_time_scale_shift, cross_attention_norm, attention_head_dim). Parameters stay in
the dtype they were loaded in; compute runs in `dtype` with norm statistics, softmaxes and the time
features in float32.
"""
import dataclasses
import json
import math
import os
import re
import threading
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from imagen_jax.models import layers

Dtype = Any

DOWN_BLOCKS = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
UP_BLOCKS = ("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DSimpleCrossAttn", None)
ACTIVATIONS = {
    "silu": nn.silu, "swish": nn.silu, "mish": lambda x: x * jnp.tanh(nn.softplus(x)), "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),  # torch.nn.GELU() is the exact erf form
}

# diffusers 0.42.1 UNet2DConditionModel.__init__ defaults, for keys a config.json leaves out.
DIFFUSERS_DEFAULTS = dict(
    sample_size=None, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1.0, dropout=0.0, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1,
    reverse_transformer_layers_per_block=None, encoder_hid_dim=None, encoder_hid_dim_type=None,
    attention_head_dim=8, num_attention_heads=None, dual_cross_attention=False, use_linear_projection=False,
    class_embed_type=None, addition_embed_type=None, addition_time_embed_dim=None, num_class_embeds=None,
    upcast_attention=False, resnet_time_scale_shift="default", resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0, time_embedding_type="positional", time_embedding_dim=None,
    time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3,
    conv_out_kernel=3, projection_class_embeddings_input_dim=None, attention_type="default",
    class_embeddings_concat=False, mid_block_only_cross_attention=None, cross_attention_norm=None,
    addition_embed_type_num_heads=64,
)

# The released configs (IF-I-XL-v1.0/unet/config.json; IF-II-L-v1.0 as published plus diffusers'
# scripts/convert_if.py for the keys the published copy cuts off), for building the real-size
# networks without their weights (eval_shape, benchmarks, pod configs).
IF_I_XL = dict(
    in_channels=3, out_channels=6, sample_size=64, block_out_channels=[704, 1408, 2112, 2816], layers_per_block=3,
    down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
    up_block_types=["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", mid_block_scale_factor=1, attention_head_dim=64,
    cross_attention_dim=2816, encoder_hid_dim=4096, encoder_hid_dim_type="text_proj", cross_attention_norm="group_norm",
    addition_embed_type="text", addition_embed_type_num_heads=64, class_embed_type=None, act_fn="gelu",
    resnet_time_scale_shift="scale_shift", resnet_skip_time_act=False, resnet_out_scale_factor=1.0,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0)
IF_II_L = dict(
    in_channels=6, out_channels=6, sample_size=256, block_out_channels=[160, 320, 640, 960, 1280],
    layers_per_block=[2, 2, 3, 5, 5], down_block_types=["ResnetDownsampleBlock2D"] * 3 + ["SimpleCrossAttnDownBlock2D"] * 2,
    up_block_types=["SimpleCrossAttnUpBlock2D"] * 2 + ["ResnetUpsampleBlock2D"] * 3,
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", mid_block_scale_factor=1 / 0.7071, attention_head_dim=64,
    cross_attention_dim=1280, encoder_hid_dim=4096, encoder_hid_dim_type="text_proj", cross_attention_norm="group_norm",
    addition_embed_type="text", addition_embed_type_num_heads=64, class_embed_type="timestep", act_fn="gelu",
    resnet_time_scale_shift="scale_shift", resnet_skip_time_act=True, resnet_out_scale_factor=1 / 0.7071,
    time_embedding_dim=1280, time_embedding_act_fn="gelu", upcast_attention=False,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0)

WEIGHTS = "diffusion_pytorch_model"  # diffusers' file stem: <stem>[.fp16].safetensors[.index.json]


class IFConfigError(ValueError):
    """A config.json this U-Net cannot run (names the key and value), or a missing/bad weights file."""


@dataclasses.dataclass(frozen=True)
class IFUNetConfig:
    """The resolved config: every diffusers key the IF block family uses, lists expanded per level."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple
    down_block_types: tuple
    up_block_types: tuple
    mid_block_type: Optional[str]
    layers_per_block: tuple          # per down level
    attention_head_dim: tuple        # per down level (up blocks index it unreversed, as diffusers)
    only_cross_attention: tuple      # per down level
    cross_attention_dim: tuple       # per down level
    mid_block_only_cross_attention: bool
    mid_block_scale_factor: float
    resnet_out_scale_factor: float
    act_fn: str
    norm_num_groups: int
    norm_eps: float
    resnet_time_scale_shift: str
    resnet_skip_time_act: bool
    cross_attention_norm: Optional[str]
    flip_sin_to_cos: bool
    freq_shift: float
    time_embed_dim: int
    time_embedding_act_fn: Optional[str]
    timestep_post_act: Optional[str]
    encoder_hid_dim: Optional[int]   # None: text states already have cross_attention_dim channels
    addition_embed_type: Optional[str]
    addition_embed_type_num_heads: int
    class_embed_type: Optional[str]
    center_input_sample: bool
    upcast_attention: bool
    conv_in_kernel: int
    conv_out_kernel: int
    sample_size: Optional[int]

    @property
    def text_dim(self):
        """Channels of the text states the U-Net takes."""
        return self.encoder_hid_dim if self.encoder_hid_dim is not None else self.cross_attention_dim[-1]

    @property
    def downsampling(self):
        return 2 ** (len(self.block_out_channels) - 1)


def _bad(key, value, expected):
    return IFConfigError(f"unsupported U-Net config {key}={value!r}; this IF U-Net supports {expected}")


def resolve_config(raw: dict) -> IFUNetConfig:
    """A diffusers UNet2DConditionModel config dict -> IFUNetConfig, with diffusers' defaults for absent
    keys. Keys this block family does not use are ignored (diffusers ignores unknown keys too); flags
    that would change the network in ways not implemented here raise IFConfigError naming the key."""
    c = dict(DIFFUSERS_DEFAULTS)
    c.update({k: v for k, v in raw.items() if not k.startswith("_")})
    n = len(c["block_out_channels"])

    def check(key, value, allowed):
        if value not in allowed:
            raise _bad(key, value, " or ".join(repr(a) for a in allowed))

    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        types = tuple(c[key])
        if len(types) != n:
            raise IFConfigError(f"U-Net config {key} has {len(types)} entries but block_out_channels has {n}")
        for t in types:
            if t not in allowed:
                raise IFConfigError(f"unsupported U-Net config {key} entry {t!r}; this IF U-Net supports "
                                    f"{' and '.join(allowed)}")
    check("mid_block_type", c["mid_block_type"], MID_BLOCKS)
    check("time_embedding_type", c["time_embedding_type"], ("positional",))
    check("act_fn", c["act_fn"], tuple(ACTIVATIONS))
    for key in ("time_embedding_act_fn", "timestep_post_act"):
        check(key, c[key], (None,) + tuple(ACTIVATIONS))
    check("resnet_time_scale_shift", c["resnet_time_scale_shift"], ("default", "scale_shift"))
    check("cross_attention_norm", c["cross_attention_norm"], (None, "group_norm"))
    check("addition_embed_type", c["addition_embed_type"], (None, "text"))
    check("class_embed_type", c["class_embed_type"], (None, "timestep"))
    for key in ("time_cond_proj_dim", "num_class_embeds", "num_attention_heads"):
        check(key, c[key], (None,))
    for key in ("dual_cross_attention", "class_embeddings_concat"):
        check(key, c[key], (False,))
    if not isinstance(c["norm_num_groups"], int):
        raise _bad("norm_num_groups", c["norm_num_groups"], "an integer")
    hid_type = c["encoder_hid_dim_type"]
    if hid_type is None and c["encoder_hid_dim"] is not None:
        hid_type = "text_proj"  # what diffusers infers (D _set_encoder_hid_proj)
    check("encoder_hid_dim_type", hid_type, (None, "text_proj"))
    if hid_type == "text_proj" and c["encoder_hid_dim"] is None:
        raise _bad("encoder_hid_dim", None, "an integer when encoder_hid_dim_type is 'text_proj'")
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if not (isinstance(c[key], int) and c[key] % 2 == 1):
            raise _bad(key, c[key], "an odd integer")

    def per_level(key, cast):
        v = c[key]
        if isinstance(v, (list, tuple)):
            if len(v) != n:
                raise IFConfigError(f"U-Net config {key} has {len(v)} entries but down_block_types has {n}")
            return tuple(cast(x) for x in v)
        return (cast(v),) * n

    only_cross = per_level("only_cross_attention", bool)
    mid_only = c["mid_block_only_cross_attention"]
    if mid_only is None:
        mid_only = bool(c["only_cross_attention"]) if isinstance(c["only_cross_attention"], bool) else False
    cross_dim = per_level("cross_attention_dim", int)
    if c["cross_attention_norm"] == "group_norm" and any(d % 32 for d in cross_dim):
        raise _bad("cross_attention_dim", c["cross_attention_dim"],
                   "multiples of 32 with cross_attention_norm='group_norm' (norm_cross has 32 groups)")
    block_out = tuple(int(x) for x in c["block_out_channels"])
    return IFUNetConfig(
        in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]), block_out_channels=block_out,
        down_block_types=tuple(c["down_block_types"]), up_block_types=tuple(c["up_block_types"]),
        mid_block_type=c["mid_block_type"], layers_per_block=per_level("layers_per_block", int),
        attention_head_dim=per_level("attention_head_dim", int), only_cross_attention=only_cross,
        cross_attention_dim=cross_dim, mid_block_only_cross_attention=bool(mid_only),
        mid_block_scale_factor=float(c["mid_block_scale_factor"]),
        resnet_out_scale_factor=float(c["resnet_out_scale_factor"]), act_fn=c["act_fn"],
        norm_num_groups=c["norm_num_groups"], norm_eps=float(c["norm_eps"]),
        resnet_time_scale_shift=c["resnet_time_scale_shift"], resnet_skip_time_act=bool(c["resnet_skip_time_act"]),
        cross_attention_norm=c["cross_attention_norm"], flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
        freq_shift=float(c["freq_shift"]), time_embed_dim=int(c["time_embedding_dim"] or 4 * block_out[0]),
        time_embedding_act_fn=c["time_embedding_act_fn"], timestep_post_act=c["timestep_post_act"],
        encoder_hid_dim=int(c["encoder_hid_dim"]) if hid_type == "text_proj" else None,
        addition_embed_type=c["addition_embed_type"],
        addition_embed_type_num_heads=int(c["addition_embed_type_num_heads"]),
        class_embed_type=c["class_embed_type"], center_input_sample=bool(c["center_input_sample"]),
        upcast_attention=bool(c["upcast_attention"]), conv_in_kernel=c["conv_in_kernel"],
        conv_out_kernel=c["conv_out_kernel"], sample_size=c["sample_size"])


# --------------------------------------------------------------------------- layers


def _part(init, names):
    return nn.with_logical_partitioning(init, names)


def _dense(features, in_axis, out_axis, dtype, param_dtype, name):
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=_part(nn.initializers.lecun_normal(), (in_axis, out_axis)),
                    bias_init=_part(nn.initializers.zeros_init(), (out_axis,)), name=name)


def _conv(features, kernel, dtype, param_dtype, name):
    # Kernels OHWI (torch's OIHW with the input axis moved last), cuDNN's layout for NHWC: no
    # per-call kernel transpose (layers.Conv says why).
    pad = (kernel - 1) // 2
    return layers.Conv(features, kernel, 1, dtype, padding=((pad, pad), (pad, pad)), param_dtype=param_dtype,
                       name=name)


def _group_norm(groups, eps, dtype, param_dtype, name):
    # Two-pass variance: over text with many identical pad rows a group's variance is tiny against its
    # mean square, and the one-pass E[x^2] - E[x]^2 loses most of its digits.
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False,
                        scale_init=_part(nn.initializers.ones_init(), ("norm",)),
                        bias_init=_part(nn.initializers.zeros_init(), ("norm",)), name=name)


def _layer_norm(eps, dtype, param_dtype, name):
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                        scale_init=_part(nn.initializers.ones_init(), ("norm",)),
                        bias_init=_part(nn.initializers.zeros_init(), ("norm",)), name=name)


def timestep_features(t, dim, flip_sin_to_cos=True, freq_shift=0.0):
    """diffusers' Timesteps: t [B] (raw integers) -> [B, dim] float32 (cos first when flipped)."""
    half = dim // 2
    exponent = (-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32)) / (half - freq_shift)
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    features: int
    act_fn: str
    post_act: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats):
        h = _dense(self.features, None, "mlp", self.dtype, self.param_dtype, "linear_1")(feats.astype(self.dtype))
        h = _dense(self.features, "mlp", "cond", self.dtype, self.param_dtype, "linear_2")(ACTIVATIONS[self.act_fn](h))
        return ACTIVATIONS[self.post_act](h) if self.post_act else h


class TextTimeEmbedding(nn.Module):
    """addition_embed_type="text": attention pooling of the raw text states [B, L, D] -> [B, features]."""

    features: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, text):
        d = text.shape[-1]
        h = _layer_norm(1e-5, self.dtype, self.param_dtype, "norm1")(text)
        pooled = AttentionPooling(self.num_heads, self.dtype, self.param_dtype, name="pool")(h)
        out = _dense(self.features, "text_embed", "mlp", self.dtype, self.param_dtype, "proj")(pooled)
        del d
        return _layer_norm(1e-5, self.dtype, self.param_dtype, "norm2")(out)


class AttentionPooling(nn.Module):
    """A class token (mean of all tokens, pads included, + a learned embedding) attends over itself and
    the tokens; q and k are each scaled by head_dim^-1/4; the softmax runs in float32; no output projection."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, _, d = x.shape
        dph = d // self.num_heads
        pos = self.param("positional_embedding", _part(nn.initializers.normal(d ** -0.5), (None, "text_embed")),
                         (1, d), self.param_dtype)
        cls = jnp.mean(x, axis=1, keepdims=True) + pos.astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1)
        proj = lambda name, y: _dense(d, "text_embed", "heads", self.dtype, self.param_dtype, name)(y)  # noqa: E731
        heads = lambda y: y.reshape(b, y.shape[1], self.num_heads, dph)  # noqa: E731
        scale = dph ** -0.25
        q, k, v = heads(proj("q_proj", cls)) * scale, heads(proj("k_proj", x)) * scale, heads(proj("v_proj", x))
        # diffusers softmaxes these logits in float32; with one query token the cast costs nothing
        w = jax.nn.softmax(jnp.einsum("bqhc,bkhc->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)), axis=-1)
        out = jnp.einsum("bhqk,bkhc->bqhc", w.astype(v.dtype), v)
        return out.reshape(b, d)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D; `resample` "down" (2x2 average pool) or "up" (nearest 2x) applies to both
    paths after norm1 + act, before conv1."""

    features: int
    cfg: IFUNetConfig
    output_scale_factor: float = 1.0
    resample: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        act = ACTIVATIONS[c.act_fn]
        h = act(_group_norm(c.norm_num_groups, c.norm_eps, dt, pdt, "norm1")(x))
        if self.resample == "up":
            h, x = (jnp.repeat(jnp.repeat(a, 2, axis=1), 2, axis=2) for a in (h, x))
        elif self.resample == "down":
            h, x = (nn.avg_pool(a, (2, 2), (2, 2)) for a in (h, x))
        h = _conv(self.features, 3, dt, pdt, "conv1")(h)
        t = temb if c.resnet_skip_time_act else act(temb)
        shift_scale = c.resnet_time_scale_shift == "scale_shift"
        t = _dense((2 if shift_scale else 1) * self.features, "cond", "mlp", dt, pdt, "time_emb_proj")(t)
        t = t[:, None, None, :]
        norm2 = _group_norm(c.norm_num_groups, c.norm_eps, dt, pdt, "norm2")
        if shift_scale:
            scale, shift = jnp.split(t, 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h + t)
        h = _conv(self.features, 3, dt, pdt, "conv2")(act(h))
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, dt, pdt, "conv_shortcut")(x)
        return layers.constrain((x + h) / self.output_scale_factor)


def _xla_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v with float32 logits and softmax (as diffusers' upcast_softmax).
    jax.nn.dot_product_attention(implementation="xla") does the same but pins an F16_F16_F32 dot
    algorithm that the CPU backend refuses under jit, so fp16 would not run on CPU."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


class AddedKVAttention(nn.Module):
    """diffusers Attention with added_kv_proj_dim under AttnAddedKVProcessor: pixels (group-normed) query
    keys/values of [text ; pixels] (text only with only_cross_attention); the residual is added here."""

    head_dim: int
    cfg: IFUNetConfig
    only_cross: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, enc):
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        b, hgt, wid, ch = x.shape
        heads = ch // self.head_dim
        inner = heads * self.head_dim
        if c.cross_attention_norm == "group_norm":  # always 32 groups, Attention's eps 1e-5
            enc = _group_norm(32, 1e-5, dt, pdt, "norm_cross")(enc)
        hs = _group_norm(c.norm_num_groups, 1e-5, dt, pdt, "group_norm")(x).reshape(b, hgt * wid, ch)
        dense = lambda name, in_axis, y: _dense(inner, in_axis, "heads", dt, pdt, name)(y)  # noqa: E731
        q = dense("to_q", "embed", hs)
        k = dense("add_k_proj", "text_embed", enc)
        v = dense("add_v_proj", "text_embed", enc)
        if not self.only_cross:
            k = jnp.concatenate([k, dense("to_k", "embed", hs)], axis=1)
            v = jnp.concatenate([v, dense("to_v", "embed", hs)], axis=1)
        split = lambda a: a.reshape(b, a.shape[1], heads, self.head_dim)  # noqa: E731
        # No mask reaches the IF U-Net: every key (pad rows of the text included) is attended to.
        if self.attention_impl == "cudnn":
            o = layers.attention(split(q), split(k), split(v), jnp.ones((b, k.shape[1]), bool), "cudnn")
        else:
            o = _xla_attention(split(q), split(k), split(v))
        o = _dense(ch, "heads", "embed", dt, pdt, "to_out_0")(o.reshape(b, hgt * wid, inner))
        return layers.constrain(x + o.reshape(b, hgt, wid, ch).astype(x.dtype))


class DownBlock(nn.Module):
    """ResnetDownsampleBlock2D / SimpleCrossAttnDownBlock2D number `index`; returns h and its skips."""

    index: int
    cfg: IFUNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, h, emb, text):
        c, i, dt, pdt = self.cfg, self.index, self.dtype, self.param_dtype
        ch, skips = c.block_out_channels[i], []
        for j in range(c.layers_per_block[i]):
            h = ResnetBlock(ch, c, c.resnet_out_scale_factor, None, dt, pdt, name=f"resnets_{j}")(h, emb)
            if c.down_block_types[i] == "SimpleCrossAttnDownBlock2D":
                h = AddedKVAttention(c.attention_head_dim[i], c, c.only_cross_attention[i], dt, pdt,
                                     self.attention_impl, name=f"attentions_{j}")(h, text)
            skips.append(h)
        if i < len(c.block_out_channels) - 1:
            h = ResnetBlock(ch, c, c.resnet_out_scale_factor, "down", dt, pdt, name="downsamplers_0")(h, emb)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DSimpleCrossAttn: resnet, attention, resnet (scaled by mid_block_scale_factor)."""

    cfg: IFUNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, h, emb, text):
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        ch = c.block_out_channels[-1]
        h = ResnetBlock(ch, c, c.mid_block_scale_factor, None, dt, pdt, name="resnets_0")(h, emb)
        h = AddedKVAttention(c.attention_head_dim[-1], c, c.mid_block_only_cross_attention, dt, pdt,
                             self.attention_impl, name="attentions_0")(h, text)
        return ResnetBlock(ch, c, c.mid_block_scale_factor, None, dt, pdt, name="resnets_1")(h, emb)


class UpBlock(nn.Module):
    """ResnetUpsampleBlock2D / SimpleCrossAttnUpBlock2D number `index` (counted from the bottom);
    consumes its skips last-first, each concatenated after h ([h, skip])."""

    index: int
    cfg: IFUNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, h, skips, emb, text):
        c, i, dt, pdt = self.cfg, self.index, self.dtype, self.param_dtype
        n = len(c.block_out_channels)
        ch = c.block_out_channels[n - 1 - i]
        for j, skip in enumerate(reversed(skips)):
            h = jnp.concatenate([h, skip], axis=-1)
            h = ResnetBlock(ch, c, c.resnet_out_scale_factor, None, dt, pdt, name=f"resnets_{j}")(h, emb)
            if c.up_block_types[i] == "SimpleCrossAttnUpBlock2D":
                # attention_head_dim is indexed unreversed in the up blocks, as diffusers does.
                h = AddedKVAttention(c.attention_head_dim[i], c, c.only_cross_attention[n - 1 - i], dt, pdt,
                                     self.attention_impl, name=f"attentions_{j}")(h, text)
        if i < n - 1:
            h = ResnetBlock(ch, c, c.resnet_out_scale_factor, "up", dt, pdt, name="upsamplers_0")(h, emb)
        return h


# --------------------------------------------------------------------------- the U-Net


class IFUNet(nn.Module):
    """The IF U-Net. __call__(x [B,H,W,C], t [B], text_states [B,L,D], noise_level [B] | None)."""

    config: IFUNetConfig
    dtype: Dtype = jnp.float32          # compute dtype
    param_dtype: Dtype = jnp.float32    # dtype the parameters are stored in
    attention_impl: str = "auto"        # "auto" (cuDNN flash on GPU for bf16/fp16, else XLA) | "xla" | "cudnn"

    def _check(self, x, t, text, noise_level):
        c = self.config
        if x.ndim != 4 or x.shape[-1] != c.in_channels:
            raise ValueError(f"x must be [B, H, W, {c.in_channels}] (NHWC), got shape {x.shape}")
        if x.shape[1] % c.downsampling or x.shape[2] % c.downsampling:
            raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not divisible by the U-Net's "
                             f"downsampling {c.downsampling}")
        if text.ndim != 3 or text.shape[-1] != c.text_dim:
            raise ValueError(f"text_states must be [B, L, {c.text_dim}], got shape {text.shape}")
        if c.class_embed_type == "timestep" and noise_level is None:
            raise ValueError("this U-Net has class_embed_type='timestep' (an IF stage II): pass noise_level [B]")

    @nn.compact
    def __call__(self, x, t, text_states, noise_level=None):
        c, dt, pdt = self.config, jnp.dtype(self.dtype), self.param_dtype
        self._check(x, t, text_states, noise_level)
        impl = layers.choose_attention_impl(self.attention_impl, dt)
        act = ACTIVATIONS[c.act_fn]
        b = x.shape[0]
        c0, temb_dim = c.block_out_channels[0], c.time_embed_dim
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        text = text_states.astype(dt)

        feats = timestep_features(t, c0, c.flip_sin_to_cos, c.freq_shift)
        emb = TimestepEmbedding(temb_dim, c.act_fn, c.timestep_post_act, dt, pdt, name="time_embedding")(feats)
        if c.class_embed_type == "timestep":
            nl = jnp.broadcast_to(jnp.asarray(noise_level), (b,))
            cf = timestep_features(nl, c0, c.flip_sin_to_cos, c.freq_shift)
            emb = emb + TimestepEmbedding(temb_dim, c.act_fn, None, dt, pdt, name="class_embedding")(cf)
        if c.addition_embed_type == "text":
            emb = emb + TextTimeEmbedding(temb_dim, c.addition_embed_type_num_heads, dt, pdt,
                                          name="add_embedding")(text)
        if c.time_embedding_act_fn:
            emb = ACTIVATIONS[c.time_embedding_act_fn](emb)
        if c.encoder_hid_dim is not None:
            text = _dense(c.cross_attention_dim[-1], "text_embed", "mlp", dt, pdt, "encoder_hid_proj")(text)

        h = x.astype(dt)
        if c.center_input_sample:
            h = 2 * h - 1.0
        h = _conv(c0, c.conv_in_kernel, dt, pdt, "conv_in")(h)
        skips = [h]
        n = len(c.block_out_channels)
        for i in range(n):
            h, out = DownBlock(i, c, dt, pdt, impl, name=f"down_blocks_{i}")(h, emb, text)
            skips.extend(out)
        if c.mid_block_type is not None:
            h = MidBlock(c, dt, pdt, impl, name="mid_block")(h, emb, text)
        for i in range(n):
            k = c.layers_per_block[n - 1 - i] + 1
            h = UpBlock(i, c, dt, pdt, impl, name=f"up_blocks_{i}")(h, skips[-k:], emb, text)
            del skips[-k:]
        h = act(_group_norm(c.norm_num_groups, c.norm_eps, dt, pdt, "conv_norm_out")(h))
        out = _conv(c.out_channels, c.conv_out_kernel, dt, pdt, "conv_out")(h)
        return out.astype(jnp.float32)


# --------------------------------------------------------------------------- building


def build_unet(config, dtype=jnp.float32, *, compute_dtype=None, attention_impl="auto") -> IFUNet:
    """The module for a config dict (a parsed config.json) or an IFUNetConfig; no weights.
    dtype: the parameters' dtype; compute_dtype: the activations' (default: dtype)."""
    cfg = config if isinstance(config, IFUNetConfig) else resolve_config(config)
    if attention_impl not in ("auto", "xla", "cudnn"):
        raise ValueError(f"attention_impl must be auto, xla or cudnn, got {attention_impl!r}")
    return IFUNet(cfg, dtype=jnp.dtype(compute_dtype or dtype), param_dtype=jnp.dtype(dtype),
                  attention_impl=attention_impl)


def init_inputs(cfg: IFUNetConfig, batch=1, text_len=77, size=None):
    """Dummy (x, t, text_states, noise_level) of the right shapes for init / eval_shape."""
    s = size or cfg.sample_size or 8 * cfg.downsampling
    x = jnp.zeros((batch, s, s, cfg.in_channels), jnp.float32)
    nl = jnp.zeros((batch,), jnp.int32) if cfg.class_embed_type == "timestep" else None
    return x, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, text_len, cfg.text_dim), jnp.float32), nl


def param_shapes(module: IFUNet, size=None):
    """Abstract parameters (boxed with their logical axis names), allocating nothing. The image and
    text sizes of the dummy inputs do not change any parameter shape."""
    args = init_inputs(module.config, size=size or 8 * module.config.downsampling, text_len=4)
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))["params"]


def read_config(unet_dir) -> dict:
    path = os.path.join(os.fspath(unet_dir), "config.json")
    if not os.path.isfile(path):
        raise IFConfigError(f"{path}: no such file; a diffusers U-Net directory (e.g. IF-I-XL-v1.0/unet) "
                            "holds config.json and diffusion_pytorch_model[.fp16].safetensors")
    try:
        with open(path) as f:
            raw = json.load(f)
    except ValueError as e:
        raise IFConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise IFConfigError(f"{path}: expected a JSON object of U-Net settings")
    return raw


# --------------------------------------------------------------------------- weights


def _weight_files(unet_dir, dtype):
    """{torch key: file} for the preferred weights variant in unet_dir: the one stored in `dtype` if
    present, else the other (converted on load). Sharded sets are read through their index."""
    d = os.fspath(unet_dir)
    fp32 = ("", ".safetensors.index.json")
    fp16 = (".fp16", ".safetensors.index.fp16.json")
    order = (fp16, fp32) if jnp.dtype(dtype) == jnp.float16 else (fp32, fp16)
    for variant, index in order:
        single = os.path.join(d, f"{WEIGHTS}{variant}.safetensors")
        if os.path.isfile(single):
            return single, None
        index_path = os.path.join(d, WEIGHTS + index)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise IFConfigError(f"{index_path}: not a safetensors index with a weight_map: {e}") from None
            files = {k: os.path.join(d, v) for k, v in weight_map.items()}
            missing = sorted({f for f in files.values() if not os.path.isfile(f)})
            if missing:
                raise IFConfigError(f"{index_path}: shard file(s) listed in the index do not exist: {missing[:3]}")
            return index_path, files
    found = sorted(os.listdir(d)) if os.path.isdir(d) else []
    if any(f.endswith(".bin") for f in found):
        raise IFConfigError(f"{d}: only PyTorch .bin weights found ({[f for f in found if f.endswith('.bin')][:2]}), "
                            f"which are never unpickled; download {WEIGHTS}.safetensors or "
                            f"{WEIGHTS}.fp16.safetensors from the model repository")
    raise IFConfigError(f"{d}: no U-Net weights; expected {WEIGHTS}.safetensors, {WEIGHTS}.fp16.safetensors "
                        f"or a sharded set with {WEIGHTS}.safetensors.index.json; found {found or 'nothing'}")


def _tensor_table(origin, files):
    """{torch key: (file, shape)} of every tensor in the weight files."""
    from safetensors import safe_open

    table = {}
    for file in sorted(set(files.values())) if files else [origin]:
        try:
            with safe_open(file, framework="numpy") as h:
                for name in h.keys():
                    table[name] = (file, tuple(h.get_slice(name).get_shape()))
        except Exception as e:  # safetensors raises its own error types
            raise IFConfigError(f"{file}: not a readable safetensors file: {str(e).splitlines()[0]}") from None
    return table


def flax_path(torch_key: str, ndim: int) -> tuple[tuple[str, ...], Optional[tuple[int, ...]]]:
    """A diffusers tensor name -> (the Flax parameter path, the axis permutation from torch layout).
    'down_blocks.0.resnets.1.conv1.weight' (4-d) -> (('down_blocks_0', 'resnets_1', 'conv1', 'kernel'), (0, 2, 3, 1))."""
    parts = re.sub(r"\.(\d+)(?=\.|$)", r"_\1", torch_key).split(".")
    *mods, leaf = parts
    if leaf == "weight":
        if ndim == 4:  # conv OIHW -> OHWI (layers.Conv)
            return (*mods, "kernel"), (0, 2, 3, 1)
        if ndim == 2:  # linear [out, in] -> [in, out]
            return (*mods, "kernel"), (1, 0)
        return (*mods, "scale"), None  # GroupNorm / LayerNorm
    return (*mods, leaf), None


def _reader(file, name, perm, dtype):
    def read(index):
        from safetensors import safe_open

        with safe_open(file, framework="numpy") as h:
            sl = h.get_slice(name)
            if perm is None:
                a = sl[index]
            else:  # Flax dim i is torch dim perm[i]: slice in torch layout, then permute
                tidx = [None] * len(perm)
                for i, p in enumerate(perm):
                    tidx[p] = index[i]
                a = np.transpose(sl[tuple(tidx)], perm)
        return np.ascontiguousarray(a.astype(dtype, copy=False))
    return read


def _full_index(index, shape):
    return tuple(slice(*s.indices(n)) if isinstance(s, slice) else slice(0, n) for s, n in zip(index, shape))


def load_params(unet_dir, module: IFUNet, shardings=None):
    """Reads the U-Net weights in unet_dir into the module's parameter tree (dtype module.param_dtype).
    shardings: None (default device) or a tree of Shardings like the params: each device then reads
    only its own slice, so the host never holds a full copy of a sharded array."""
    dtype = np.dtype(module.param_dtype)
    origin, files = _weight_files(unet_dir, dtype)
    table = _tensor_table(origin, files)
    expected = traverse_util.flatten_dict(nn.meta.unbox(param_shapes(module)))
    mapped = {}
    for name, (file, shape) in table.items():
        path, perm = flax_path(name, len(shape))
        mapped[path] = (name, file, shape, perm)
    unexpected = sorted(mapped[p][0] for p in set(mapped) - set(expected))
    missing = sorted(".".join(p) for p in set(expected) - set(mapped))
    if unexpected or missing:
        raise IFConfigError(f"{origin}: weights do not match config.json: "
                            f"{len(missing)} parameter(s) missing from the checkpoint {missing[:5]}, "
                            f"{len(unexpected)} checkpoint tensor(s) not in the model {unexpected[:5]}")
    wrong = []
    for path, (name, file, shape, perm) in mapped.items():
        flax_shape = tuple(shape[p] for p in perm) if perm else shape
        if flax_shape != tuple(expected[path].shape):
            wrong.append(f"{name} {shape}")
    if wrong:
        raise IFConfigError(f"{origin}: {len(wrong)} tensor(s) have the wrong shape for config.json: {sorted(wrong)[:5]}")
    flat_sh = traverse_util.flatten_dict(shardings) if shardings is not None else {}

    def load(path):
        name, file, shape, perm = mapped[path]
        read = _reader(file, name, perm, dtype)
        shape = tuple(expected[path].shape)
        sharding = flat_sh.get(path)
        if sharding is None:
            return jax.device_put(read(_full_index((slice(None),) * len(shape), shape)))
        cache, lock = {}, threading.Lock()

        def callback(index):  # replicas of one slice are read once
            index = _full_index(index, shape)
            key = tuple((s.start, s.stop) for s in index)
            with lock:
                if key not in cache:
                    cache[key] = read(index)
                return cache[key]
        return jax.make_array_from_callback(shape, sharding, callback)

    return traverse_util.unflatten_dict({p: load(p) for p in expected})


def load_unet(unet_dir, dtype=jnp.float32, *, compute_dtype=None, attention_impl="auto", shardings=None):
    """(module, params) for the diffusers U-Net directory unet_dir (config.json + safetensors weights).

    dtype: the parameters' dtype (the weights file stored in it is preferred, the other is converted);
    compute_dtype: the activations' (default: dtype). shardings: None, or a function of the abstract
    (logically annotated) params returning their Shardings, e.g.
    `lambda p: parallel.logical_shardings(p, mesh, config.mesh.rules)`: the params are then created
    already sharded, each device reading only its own slice of every weight.
    """
    module = build_unet(read_config(unet_dir), dtype, compute_dtype=compute_dtype, attention_impl=attention_impl)
    tree = shardings(param_shapes(module)) if shardings is not None else None
    return module, load_params(unet_dir, module, tree)


def count_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.meta.unbox(tree)))


__all__ = ["IF_II_L", "IF_I_XL", "IFConfigError", "IFUNet", "IFUNetConfig", "build_unet", "count_params", "init_inputs", "load_params",
           "load_unet", "param_shapes", "read_config", "resolve_config", "timestep_features"]
