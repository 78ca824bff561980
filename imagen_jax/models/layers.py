"""U-Net building blocks. Every parameter carries logical axis names so the sharding layer can place
it; activations are NHWC.

Logical parameter axes: conv_in / conv_out (convolution channels), embed (image channels into a
dense layer), heads (attention projection outputs), text_embed (text-encoder width), cond (the
conditioning embedding), mlp (hidden width of the conditioning MLPs), norm (norm scales/biases).
Logical activation axes: batch, height, width, channels.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
ACT_AXES = ("batch", "height", "width", "channels")


def _part(init, names):
    return nn.with_logical_partitioning(init, names)


TEXT_CACHE = "text_cache"


def text_cached(module, name, compute):
    """The value of `compute()`, a projection of the text alone, read from the "text_cache"
    collection when the caller supplies one, and stored there when the collection is mutable.

    Within one sampling run the text is the same at every step, so a sampler computes these once
    (models.unet.text_cache) instead of at every U-Net call: XLA on the H200 did not hoist the
    loop-invariant projections out of the sampling loop (as with the conv kernels' casts)."""
    if module.has_variable(TEXT_CACHE, name):
        return module.get_variable(TEXT_CACHE, name)
    value = compute()
    if module.is_mutable_collection(TEXT_CACHE) and not module.is_initializing():  # init returns params only
        module.put_variable(TEXT_CACHE, name, value)
    return value


def constrain(x):
    """Logical sharding constraint at block boundaries (a no-op without axis rules in scope)."""
    return nn.with_logical_constraint(x, ACT_AXES)


class Conv(nn.Module):
    """2-D convolution of NHWC activations ("SAME" padding unless given), kernel stored [out, kh, kw, in] (OHWI).

    OHWI, not Flax's HWIO: with NHWC activations cuDNN's filter layout is KRSC (= OHWI), and its
    weight-gradient kernel writes that layout. An HWIO parameter made XLA's optimizer update read
    every conv gradient transposed (profiled on an H200, base64 paper, Adam: 41 ms of a 581 ms
    step in transposing update fusions running at ~1/4 of memory bandwidth) and transpose every
    kernel again for the forward pass. Numerics are those of nn.Conv (same init distribution,
    compute in `dtype`, parameters in `param_dtype`). DeepFloyd IF's U-Net uses it too, with its
    explicit (k - 1) // 2 padding.
    """

    features: int
    kernel: int = 3
    stride: int = 1
    dtype: Dtype = jnp.float32
    zero: bool = False
    padding: Any = "SAME"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel
        init = nn.initializers.zeros_init() if self.zero else nn.initializers.lecun_normal(in_axis=-1, out_axis=0)
        w = self.param("kernel", _part(init, ("conv_out", None, None, "conv_in")),
                       (self.features, k, k, x.shape[-1]), self.param_dtype)
        b = self.param("bias", _part(nn.initializers.zeros_init(), ("conv_out",)), (self.features,), self.param_dtype)
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), w.astype(self.dtype), (self.stride, self.stride),
                                         self.padding, dimension_numbers=("NHWC", "OHWI", "NHWC"))
        return y + b.astype(self.dtype)


def conv(features, kernel=3, stride=1, dtype=jnp.float32, zero=False, name=None):
    return Conv(features, kernel, stride, dtype, zero, name=name)


def upsample_nearest(x):
    """2x nearest-neighbour upsampling of NHWC as a broadcast (equal to jax.image.resize "nearest"
    at 2x): its gradient is a sum over each 2x2 block, where resize's gather has a scatter-add
    gradient (2 ms per 64x64x1024 activation at batch 64 on an H200)."""
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def dense(features, in_axis, out_axis, dtype=jnp.float32, zero=False, use_bias=True, name=None):
    init = nn.initializers.zeros_init() if zero else nn.initializers.lecun_normal()
    return nn.Dense(features, dtype=dtype, use_bias=use_bias, kernel_init=_part(init, (in_axis, out_axis)),
                    bias_init=_part(nn.initializers.zeros_init(), (out_axis,)), name=name)


def group_norm(num_groups, dtype, name=None, use_scale=True, use_bias=True):
    return nn.GroupNorm(num_groups=num_groups, epsilon=1e-5, dtype=dtype, use_scale=use_scale,
                        use_bias=use_bias,
                        scale_init=_part(nn.initializers.ones_init(), ("norm",)),
                        bias_init=_part(nn.initializers.zeros_init(), ("norm",)), name=name)


def layer_norm(dtype, name=None):
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, scale_init=_part(nn.initializers.ones_init(), ("norm",)),
                        bias_init=_part(nn.initializers.zeros_init(), ("norm",)), name=name)


def sinusoidal_embedding(x, dim, max_period=10000.0):
    """x [B] -> [B, dim] float32 sin/cos features."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = x.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def noise_level_features(logsnr, dim):
    """Embeds a log-SNR [B] through the bounded, monotone time t = 2/pi atan(exp(-logsnr / 2)) in
    [0, 1] (the cosine schedule's time), so any schedule feeds the network the same range."""
    t = jnp.arctan(jnp.exp(-0.5 * logsnr.astype(jnp.float32))) * (2.0 / jnp.pi)
    return sinusoidal_embedding(1000.0 * t, dim)


def choose_attention_impl(impl, dtype):
    if impl != "auto":
        return impl
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def attention(q, k, v, kv_mask, impl="xla"):
    """Multi-head attention. q [B, Lq, H, D]; k, v [B, Lk, H, D]; kv_mask [B, Lk] bool (True = attend).

    With impl "cudnn" the mask must be a prefix mask (valid keys first), which the U-Nets guarantee by
    placing image tokens, then a null token, then the (right-padded) text tokens; the mask is then
    passed as key lengths so the flash kernel applies.
    """
    if impl == "cudnn":
        lengths = jnp.sum(kv_mask.astype(jnp.int32), axis=-1)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=kv_mask[:, None, None, :], implementation="xla")


def _resample(x, resample):
    """Parameter-free 2x resampling inside a BigGAN block: average pooling or nearest upsampling."""
    if resample == "down":
        return nn.avg_pool(x, (2, 2), strides=(2, 2))
    if resample == "up":
        return upsample_nearest(x)
    return x


class ResBlock(nn.Module):
    """Residual block with scale-shift conditioning on the embedding [B, cond] (ADM / BigGAN).

    resample "down" / "up" makes it a BigGAN resampling block (ADM's `resblock_updown`, Imagen
    App. F.1 `res_block_type: biggan`): both the residual branch (after its first norm and
    activation) and the skip are average-pooled or nearest-upsampled, so the resolution changes
    inside the block instead of in a separate strided or upsampling convolution.
    """

    features: int
    num_groups: int = 32
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    resample: str = "none"  # none | down | up

    @nn.compact
    def __call__(self, x, emb, train=False):
        h = nn.silu(group_norm(self.num_groups, self.dtype, name="norm1")(x))
        h, x = _resample(h, self.resample), _resample(x, self.resample)
        h = conv(self.features, dtype=self.dtype, name="conv1")(h)
        ss = dense(2 * self.features, "cond", "mlp", dtype=self.dtype, name="emb_proj")(nn.silu(emb))
        scale, shift = jnp.split(ss[:, None, None, :], 2, axis=-1)
        h = group_norm(self.num_groups, self.dtype, name="norm2")(h) * (1.0 + scale) + shift
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        h = conv(self.features, dtype=self.dtype, zero=True, name="conv2")(h)
        if x.shape[-1] != self.features:
            x = conv(self.features, kernel=1, dtype=self.dtype, name="skip")(x)
        return constrain(x + h)


class AttentionBlock(nn.Module):
    """Self-attention over the pixels, optionally with the layer-normed text embeddings concatenated
    into the keys and values (Imagen App. D.3.1), or cross-attention to the text alone.

    mode: "self" (pixels only), "self_text" (pixels + text in keys/values), "cross" (text only, with
    a learned null token so an all-padding prompt still has a key to attend to).
    """

    head_dim: int = 64
    num_heads: int = 0  # 0: channels // head_dim
    mode: str = "self_text"
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, text=None, text_mask=None):
        b, hgt, wid, c = x.shape
        heads = self.num_heads or max(c // self.head_dim, 1)
        hd = self.head_dim if self.num_heads else c // heads
        inner = heads * hd
        h = group_norm(self.num_groups, self.dtype, name="norm")(x).reshape(b, hgt * wid, c)
        if self.mode == "cross":
            q = dense(inner, "embed", "heads", dtype=self.dtype, name="q")(h)
            keys, values, masks = [], [], []
        else:
            q, k, v = jnp.split(dense(3 * inner, "embed", "heads", dtype=self.dtype, name="qkv")(h), 3, axis=-1)
            keys, values, masks = [k], [v], [jnp.ones((b, hgt * wid), bool)]
        if self.mode == "cross":
            null = self.param("null_kv", _part(nn.initializers.normal(0.02), (None, "heads")), (2, inner))
            keys.append(jnp.broadcast_to(null[0].astype(self.dtype), (b, 1, inner)))
            values.append(jnp.broadcast_to(null[1].astype(self.dtype), (b, 1, inner)))
            masks.append(jnp.ones((b, 1), bool))
        if self.mode in ("self_text", "cross"):
            tk, tv = text_cached(self, "kv", lambda: tuple(jnp.split(dense(
                2 * inner, "text_embed", "heads", dtype=self.dtype, name="text_kv")(
                layer_norm(self.dtype, name="text_norm")(text)), 2, axis=-1)))
            keys.append(tk)
            values.append(tv)
            masks.append(text_mask.astype(bool))
        k = jnp.concatenate(keys, axis=1)
        v = jnp.concatenate(values, axis=1)
        mask = jnp.concatenate(masks, axis=1)
        split = lambda a: a.reshape(b, a.shape[1], heads, hd).astype(self.dtype)  # noqa: E731
        out = attention(split(q), split(k), split(v), mask, self.attention_impl)
        out = dense(c, "heads", "embed", dtype=self.dtype, zero=True, name="out")(out.reshape(b, hgt * wid, inner))
        return constrain(x + out.reshape(b, hgt, wid, c))


class TextPooling(nn.Module):
    """Attention pooling of the text embeddings [B, L, D] with mask [B, L] -> [B, out] (LayerNorm'd).
    An all-padding prompt (the unconditional branch of classifier-free guidance) pools to zero."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, text, mask):
        def pool():
            t = dense(self.features, "text_embed", "cond", dtype=self.dtype, name="proj")(
                layer_norm(self.dtype, name="in_norm")(text))
            query = self.param("query", _part(nn.initializers.normal(0.02), ("cond",)), (self.features,))
            logits = jnp.einsum("bld,d->bl", t.astype(jnp.float32), query) / math.sqrt(self.features)
            valid = mask.astype(bool)
            weights = jax.nn.softmax(jnp.where(valid, logits, -1e9), axis=-1) * valid
            pooled = jnp.einsum("bl,bld->bd", weights, t.astype(jnp.float32))
            pooled = layer_norm(jnp.float32, name="out_norm")(pooled)
            return jnp.where(jnp.any(valid, axis=-1, keepdims=True), pooled, 0.0)

        return text_cached(self, "pooled", pool)


def downsample(x, features, dtype, name):
    return conv(features, kernel=3, stride=2, dtype=dtype, name=name)(x)


def upsample(x, features, dtype, name):
    x = upsample_nearest(x)
    return conv(features, dtype=dtype, name=name)(x)


__all__ = ["AttentionBlock", "Conv", "ResBlock", "TextPooling", "attention", "choose_attention_impl", "conv", "dense",
           "downsample", "group_norm", "layer_norm", "noise_level_features", "sinusoidal_embedding", "upsample",
           "upsample_nearest"]
