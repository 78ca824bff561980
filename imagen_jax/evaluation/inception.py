"""The FID Inception-v3 in Flax: pool3 features that match pytorch-fid.

FID numbers are only comparable when every step matches the reference
implementation, so this module reproduces pytorch-fid's `InceptionV3`
(`use_fid_inception=True`, block 3, 2048-d) operation for operation:

    uint8 [N, H, W, 3] --/255--> bilinear resize to 299x299 (torch
    `F.interpolate(mode='bilinear', align_corners=False)`, no antialias)
    --> 2x - 1 --> Inception-v3 trunk with the FID patches (Mixed_5*/6b-e
    average pools exclude the zero padding, Mixed_7c's pool branch is a max
    pool) --> global average pool --> [N, 2048].

Layout is NHWC. Each conv is followed by its BatchNorm in inference form
(eps 1e-3), which `load` turns into a per-channel `scale` and `bias`:
`relu(conv(x, kernel) * scale + bias)`.

Weights: `load(path)` reads pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
(or the state dict of pytorch-fid's `InceptionV3` wrapper) without running
pickled code: `torch.load(weights_only=True)` when torch is importable, else
`read_torch_state_dict`, a small reader of PyTorch's zip and legacy formats
whose unpickler only admits the tensor-rebuild functions. The converted
parameters can be cached as `.npz` so later runs need neither torch nor
pickle.

Public API:
  load(path, cache_path=None, use_torch=None) -> params
  features(params, images, batch_size=50, dtype=float32, mesh=None) -> [N, 2048]
  read_torch_state_dict(path) -> {name: np.ndarray}
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from imagen_jax import paths

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
)
# SHA-256 of pytorch-fid's release file (its 8-hex prefix is the one torch.hub puts in the name).
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INPUT_SIZE = 299  # the resolution the network was trained at
FEATURE_DIM = 2048
BN_EPS = 1e-3  # torchvision's BasicConv2d BatchNorm2d(eps=0.001)
NUM_CLASSES = 1008  # the 2015 TF graph's classifier; torchvision's ImageNet model has 1000

Params = dict  # nested {module: {... {'kernel' [kh, kw, I, O], 'scale' [O], 'bias' [O]}}}


# ----------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------


class ConvBN(nn.Module):
    """Conv (no bias) + inference BatchNorm as a per-channel affine + ReLU.

    [N, H, W, I] -> [N, H', W', features]. `padding` is torch-style symmetric
    (pad_h, pad_w).
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (*self.kernel_size, x.shape[-1], self.features),
            jnp.float32,
        )
        scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        ph, pw = self.padding
        y = lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )
        return nn.relu(y * scale.astype(self.dtype) + bias.astype(self.dtype))


def _max_pool(x, window: int, stride: int, pad: int = 0):
    """Max pool over H, W; padding is -inf so it never wins (torch semantics)."""
    return lax.reduce_window(
        x,
        jnp.array(-jnp.inf, x.dtype),
        lax.max,
        (1, window, window, 1),
        (1, stride, stride, 1),
        ((0, 0), (pad, pad), (pad, pad), (0, 0)),
    )


def _avg_pool_3x3_exclude_pad(x):
    """3x3 stride-1 average pool, padding 1, divided by the count of real pixels.

    This is TensorFlow's (and pytorch-fid's `count_include_pad=False`) pool:
    border outputs average over 4 or 6 pixels instead of 9.
    """
    _, h, w, _ = x.shape
    summed = lax.reduce_window(
        x, jnp.array(0, x.dtype), lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
        ((0, 0), (1, 1), (1, 1), (0, 0)),
    )

    def counts(n):  # how many of {i-1, i, i+1} lie inside [0, n)
        c = np.full((n,), 3.0)
        c[0] -= 1
        c[-1] -= 1
        return np.maximum(c, 1.0)

    count = np.outer(counts(h), counts(w))[None, :, :, None]
    return summed / jnp.asarray(count, x.dtype)


def _cat(xs):
    return jnp.concatenate(xs, axis=-1)


class InceptionA(nn.Module):
    """FIDInceptionA: [N, 35, 35, C] -> [N, 35, 35, 224 + pool_features]."""

    pool_features: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(ConvBN, dtype=self.dtype, precision=self.precision)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
        return _cat([b1, b5, b3, bp])


class InceptionB(nn.Module):
    """Grid reduction (Mixed_6a): [N, 35, 35, 288] -> [N, 17, 17, 768]."""

    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(ConvBN, dtype=self.dtype, precision=self.precision)
        b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return _cat([b3, bd, _max_pool(x, 3, 2)])


class InceptionC(nn.Module):
    """FIDInceptionC (factorised 7x7): [N, 17, 17, 768] -> [N, 17, 17, 768]."""

    channels_7x7: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(ConvBN, dtype=self.dtype, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
        return _cat([b1, b7, bd, bp])


class InceptionD(nn.Module):
    """Grid reduction (Mixed_7a): [N, 17, 17, 768] -> [N, 8, 8, 1280]."""

    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(ConvBN, dtype=self.dtype, precision=self.precision)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return _cat([b3, b7, _max_pool(x, 3, 2)])


class InceptionE(nn.Module):
    """FIDInceptionE_1 (pool='avg') / E_2 (pool='max'): [N, 8, 8, C] -> [N, 8, 8, 2048]."""

    pool: str  # 'avg' in Mixed_7b, 'max' in Mixed_7c (the TF graph's quirk)
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(ConvBN, dtype=self.dtype, precision=self.precision)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = _cat([
            conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
        ])
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = _cat([
            conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
        ])
        if self.pool == "avg":
            pooled = _avg_pool_3x3_exclude_pad(x)
        else:
            pooled = _max_pool(x, 3, 1, pad=1)
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return _cat([b1, b3, bd, bp])


class FIDInceptionV3(nn.Module):
    """Inception-v3 trunk of the FID graph: [N, 299, 299, 3] in [-1, 1] -> [N, 2048].

    Submodule names are torchvision's, so a torch key
    `Mixed_5b.branch1x1.conv.weight` lives at `params['Mixed_5b']['branch1x1']['kernel']`.
    """

    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, precision=self.precision)
        x = ConvBN(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3", **kw)(x)  # 149
        x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3", **kw)(x)  # 147
        x = ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3", **kw)(x)
        x = _max_pool(x, 3, 2)  # 73
        x = ConvBN(80, (1, 1), name="Conv2d_3b_1x1", **kw)(x)
        x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3", **kw)(x)  # 71
        x = _max_pool(x, 3, 2)  # 35
        x = InceptionA(32, name="Mixed_5b", **kw)(x)
        x = InceptionA(64, name="Mixed_5c", **kw)(x)
        x = InceptionA(64, name="Mixed_5d", **kw)(x)
        x = InceptionB(name="Mixed_6a", **kw)(x)  # 17
        x = InceptionC(128, name="Mixed_6b", **kw)(x)
        x = InceptionC(160, name="Mixed_6c", **kw)(x)
        x = InceptionC(160, name="Mixed_6d", **kw)(x)
        x = InceptionC(192, name="Mixed_6e", **kw)(x)
        x = InceptionD(name="Mixed_7a", **kw)(x)  # 8
        x = InceptionE("avg", name="Mixed_7b", **kw)(x)
        x = InceptionE("max", name="Mixed_7c", **kw)(x)
        # Pool in float32 so bf16 runs still average 64 positions accurately.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# ----------------------------------------------------------------------------
# Preprocessing: torch's bilinear resize, reimplemented
# ----------------------------------------------------------------------------


def _linear_taps(in_size: int, out_size: int):
    """Indices and weights of torch's `align_corners=False` linear interpolation.

    Returns (i0, i1, w0, w1), each [out_size]: out[o] = w0[o] * in[i0[o]] + w1[o] * in[i1[o]].
    Computed like torch's CPU kernel (float32 scale = in / out, source
    coordinate (o + 0.5) * scale - 0.5 clamped at 0), so the taps are the same
    numbers torch uses. No antialiasing: torch's default when downsampling.
    """
    if in_size == out_size:
        idx = np.arange(out_size)
        return idx, idx, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    # torch's kernel evaluates scale * (o + 0.5) - 0.5 as one fused multiply-add
    # (a single float32 rounding); the float64 product is exact, so rounding
    # once from float64 gives the same bits.
    o = np.arange(out_size, dtype=np.float64)
    src = (np.float64(scale) * (o + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    return i0, i1, w0, w1


def resize_bilinear(x, out_h: int = INPUT_SIZE, out_w: int = INPUT_SIZE):
    """[N, H, W, C] float -> [N, out_h, out_w, C], equal to torch's
    `F.interpolate(x, (out_h, out_w), mode='bilinear', align_corners=False)`.

    Interpolates along W first, then H, as torch's kernel groups its sums.
    """
    _, h, w, _ = x.shape
    i0, i1, w0, w1 = _linear_taps(w, out_w)
    w0, w1 = (jnp.asarray(a, x.dtype)[None, None, :, None] for a in (w0, w1))
    x = jnp.take(x, i0, axis=2) * w0 + jnp.take(x, i1, axis=2) * w1
    i0, i1, w0, w1 = _linear_taps(h, out_h)
    w0, w1 = (jnp.asarray(a, x.dtype)[None, :, None, None] for a in (w0, w1))
    return w0 * jnp.take(x, i0, axis=1) + w1 * jnp.take(x, i1, axis=1)


def preprocess(images_u8):
    """uint8 [N, H, W, 3] -> float32 [N, 299, 299, 3] in [-1, 1], pytorch-fid's way.

    Order matters for bit-level parity: ToTensor's /255, then resize, then 2x - 1.
    """
    x = images_u8.astype(jnp.float32) / jnp.float32(255.0)
    x = resize_bilinear(x)
    return 2.0 * x - 1.0


# ----------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------


# `features(precision=...)`: "highest" keeps float32 convolutions in full float32 on every backend
# (the reference); "default" lets the backend pick, which on NVIDIA GPUs is TF32, as pytorch-fid's
# cuDNN convolutions run by default (torch.backends.cudnn.allow_tf32 is True).
PRECISIONS = {"highest": lax.Precision.HIGHEST, "default": None}


@functools.partial(jax.jit, static_argnames=("dtype", "precision"))
def _forward(params, images_u8, dtype, precision):
    """uint8 [B, H, W, 3] -> float32 [B, 2048]. Compiled once per (B, H, W, dtype, precision)."""
    precision = PRECISIONS[precision] if jnp.dtype(dtype) == jnp.float32 else None
    x = preprocess(images_u8)
    model = FIDInceptionV3(dtype=dtype, precision=precision)
    return model.apply({"params": params}, x.astype(dtype))


def features(
    params: Params,
    images,
    *,
    batch_size: int = 50,
    dtype=jnp.float32,
    precision: str = "highest",
    mesh: jax.sharding.Mesh | None = None,
    data_axes: str | Sequence[str] | None = None,
) -> np.ndarray:
    """Pool3 features of images: uint8 [N, H, W, 3] (any H, W) -> float32 [N, 2048].

    Images go through in batches of `batch_size`; the last batch is padded to
    full size so each input shape compiles once. `dtype=jnp.bfloat16` runs the
    convolutions in bf16 (faster, ~1e-2 relative error; float32 is the
    reference). With `mesh`, each batch is split over the mesh axes `data_axes`
    (default: all of them) and the parameters are replicated; `batch_size` is
    rounded up to a multiple of the number of shards. float32 runs use
    `Precision.HIGHEST` by default, so GPUs/TPUs do not drop to TF32/bf16 convolutions;
    `precision="default"` allows TF32 on GPUs (pytorch-fid's own default, ~2x faster there).
    Single-process: `images` are host arrays of this process.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(
            f"features expects uint8 images in [0, 255], got dtype {images.dtype}; "
            "quantise generated images the way they would be saved as PNG first"
        )
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"features expects images [N, H, W, 3], got shape {images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    n = images.shape[0]
    if n == 0:
        return np.zeros((0, FEATURE_DIM), np.float32)

    if mesh is not None:
        axes = tuple(mesh.axis_names) if data_axes is None else (
            (data_axes,) if isinstance(data_axes, str) else tuple(data_axes))
        shards = int(np.prod([mesh.shape[a] for a in axes]))
        batch_size = -(-batch_size // shards) * shards
        spec = jax.sharding.PartitionSpec(axes)
        data_sharding = jax.sharding.NamedSharding(mesh, spec)
        params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    else:
        data_sharding = None
        params = jax.device_put(params)
    batch_size = min(batch_size, n) if mesh is None else batch_size

    out = np.empty((n, FEATURE_DIM), np.float32)
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size]
        m = batch.shape[0]
        if m < batch_size:  # pad with copies of the last image; padding rows are dropped
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - m, axis=0)])
        batch = jax.device_put(batch, data_sharding) if data_sharding is not None else batch
        out[start:start + m] = np.asarray(_forward(params, batch, jnp.dtype(dtype), precision))[:m]
    return out


# ----------------------------------------------------------------------------
# Weights: expected layout, safe reading, conversion, cache
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} of the Flax parameters, e.g. ('Mixed_5b', 'branch1x1', 'kernel')."""
    shapes = jax.eval_shape(
        FIDInceptionV3().init,
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32),
    )["params"]
    flat = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, Mapping):
                walk(v, prefix + (k,))
            else:
                flat[prefix + (k,)] = tuple(v.shape)

    walk(shapes, ())
    return flat


def expected_torch_shapes() -> dict[str, tuple[int, ...]]:
    """{torch state-dict key: shape} that the FID Inception trunk needs."""
    out = {}
    for path, shape in _param_shapes().items():
        if path[-1] != "kernel":
            continue
        prefix = ".".join(path[:-1])
        kh, kw, i, o = shape
        out[f"{prefix}.conv.weight"] = (o, i, kh, kw)
        for name in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.bn.{name}"] = (o,)
    return out


# pytorch-fid's InceptionV3 wrapper stores the same layers as `blocks.<i>.<j>`.
_WRAPPER_NAMES = {
    "blocks.0.0": "Conv2d_1a_3x3", "blocks.0.1": "Conv2d_2a_3x3", "blocks.0.2": "Conv2d_2b_3x3",
    "blocks.1.0": "Conv2d_3b_1x1", "blocks.1.1": "Conv2d_4a_3x3",
    "blocks.2.0": "Mixed_5b", "blocks.2.1": "Mixed_5c", "blocks.2.2": "Mixed_5d",
    "blocks.2.3": "Mixed_6a", "blocks.2.4": "Mixed_6b", "blocks.2.5": "Mixed_6c",
    "blocks.2.6": "Mixed_6d", "blocks.2.7": "Mixed_6e",
    "blocks.3.0": "Mixed_7a", "blocks.3.1": "Mixed_7b", "blocks.3.2": "Mixed_7c",
}
_WRAPPER_RE = re.compile(r"^(blocks\.\d+\.\d+)\.(.*)$")


def _canonical_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in state.items():
        m = _WRAPPER_RE.match(k)
        if m and m.group(1) in _WRAPPER_NAMES:
            k = f"{_WRAPPER_NAMES[m.group(1)]}.{m.group(2)}"
        out[k] = v
    return out


def _check_fid_state_dict(state: Mapping[str, np.ndarray], path: str) -> None:
    """Raise ValueError unless `state` holds the FID Inception's tensors."""
    where = f"{path!r}"
    if any(k.startswith("AuxLogits.") for k in state):
        raise ValueError(
            f"{where} has AuxLogits.* tensors: it looks like torchvision's ImageNet "
            f"Inception-v3, not the FID Inception ({WEIGHTS_FILENAME}, from {WEIGHTS_URL})"
        )
    if "fc.weight" in state and tuple(state["fc.weight"].shape) != (NUM_CLASSES, FEATURE_DIM):
        raise ValueError(
            f"{where} has fc.weight of shape {tuple(state['fc.weight'].shape)}; the FID "
            f"Inception's is ({NUM_CLASSES}, {FEATURE_DIM}). Expected {WEIGHTS_FILENAME} "
            f"from {WEIGHTS_URL}"
        )
    expected = expected_torch_shapes()
    missing = sorted(set(expected) - set(state))
    wrong = sorted(
        f"{k}: {tuple(state[k].shape)} (expected {expected[k]})"
        for k in expected if k in state and tuple(state[k].shape) != expected[k]
    )
    if missing or wrong:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing keys, e.g. {missing[:5]}")
        if wrong:
            lines.append(f"{len(wrong)} shape mismatches, e.g. {wrong[:5]}")
        raise ValueError(
            f"{where} is not the FID Inception-v3 state dict ({WEIGHTS_FILENAME}): "
            + "; ".join(lines)
        )


def params_from_state_dict(state: Mapping[str, Any], path: str = "<state dict>") -> Params:
    """Torch state dict {key: array [O, I, kh, kw] / [O]} -> Flax params (float32 NumPy).

    BatchNorm becomes scale = gamma / sqrt(var + 1e-3) and
    bias = beta - mean * scale, computed in float64.
    """
    state = _canonical_keys({k: np.asarray(v) for k, v in state.items()})
    _check_fid_state_dict(state, path)
    params: dict = {}
    for p in _param_shapes():
        if p[-1] != "kernel":
            continue
        prefix = ".".join(p[:-1])
        w = state[f"{prefix}.conv.weight"].astype(np.float64)
        gamma = state[f"{prefix}.bn.weight"].astype(np.float64)
        beta = state[f"{prefix}.bn.bias"].astype(np.float64)
        mean = state[f"{prefix}.bn.running_mean"].astype(np.float64)
        var = state[f"{prefix}.bn.running_var"].astype(np.float64)
        scale = gamma / np.sqrt(var + BN_EPS)
        node = params
        for name in p[:-1]:
            node = node.setdefault(name, {})
        node["kernel"] = np.ascontiguousarray(w.transpose(2, 3, 1, 0)).astype(np.float32)
        node["scale"] = scale.astype(np.float32)
        node["bias"] = (beta - mean * scale).astype(np.float32)
    return params


# --- Safe reader of torch.save files ------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16", "UntypedStorage": np.uint8,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _StorageType:
    """Stands in for `torch.FloatStorage` & co. in a pickle: only carries a dtype."""

    def __init__(self, name: str):
        self.name = name
        dt = _STORAGE_DTYPES[name]
        self.dtype = jnp.bfloat16 if dt == "bfloat16" else np.dtype(dt)


class _Storage:
    """A flat typed buffer; `data` is filled in from the archive."""

    def __init__(self, dtype, numel: int):
        self.dtype = np.dtype(dtype)
        self.numel = numel
        self.data: np.ndarray | None = None


class _LazyTensor:
    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialize(self) -> np.ndarray:
        """A copy of the tensor's view of its storage, after checking that the view lies inside the
        storage: offset, sizes and strides come from an untrusted file, and an unchecked strided view
        reads memory outside the buffer (or crashes the process)."""
        buf = self.storage.data
        if buf is None:
            raise ValueError("a tensor's storage was never read from the file")
        offset, size, stride = self.offset, self.size, self.stride
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, *size, *stride))
        if not ints or len(size) != len(stride):
            raise ValueError(f"malformed tensor view (offset {offset!r}, size {size!r}, stride {stride!r})")
        if offset < 0 or any(v < 0 for v in size) or any(v < 0 for v in stride):
            raise ValueError(f"tensor view with a negative offset, size or stride (offset {offset}, size {size}, "
                             f"stride {stride}): not a weights file torch.save writes")
        if math.prod(size) == 0:
            return np.zeros(size, buf.dtype)
        last = offset + sum((n - 1) * st for n, st in zip(size, stride))
        if last >= buf.size:
            raise ValueError(f"tensor view (offset {offset}, size {size}, stride {stride}) runs past its storage "
                             f"of {buf.size} elements")
        item = buf.dtype.itemsize
        # np.ndarray checks the same bounds once more before any memory is touched.
        view = np.ndarray(size, buf.dtype, buffer=buf, offset=offset * item, strides=tuple(st * item for st in stride))
        return np.array(view)  # copy: detach from the shared storage


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only the globals a plain state dict needs; anything else is refused
    before it can be called, so a crafted file cannot run code."""

    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, persistent_load):
        super().__init__(file)
        self._persistent_load = persistent_load

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: only tensors and OrderedDicts are "
            "allowed in a weights file"
        )

    def persistent_load(self, pid):
        return self._persistent_load(pid)


def _as_str(x) -> str:
    return x.decode("ascii") if isinstance(x, bytes) else str(x)


def _storage_type(obj) -> _StorageType:
    if not isinstance(obj, _StorageType):
        raise pickle.UnpicklingError(f"expected a storage type in a persistent id, got {obj!r}")
    return obj


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise ValueError(f"{path!r} is a zip file without <archive>/data.pkl: not a torch.save file")
        prefix = pkl[0][: -len("data.pkl")]
        big_endian = False
        if prefix + "byteorder" in names:
            big_endian = zf.read(prefix + "byteorder").strip() == b"big"
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            if not isinstance(pid, tuple) or _as_str(pid[0]) != "storage":
                raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
            stype, key, _location, numel = pid[1:5]
            key = _as_str(key)
            if key not in storages:
                st = _Storage(_storage_type(stype).dtype, int(numel))
                raw = zf.read(f"{prefix}data/{key}")
                if st.numel < 0 or len(raw) != st.numel * st.dtype.itemsize:
                    raise ValueError(f"storage {key} holds {len(raw)} bytes but declares {st.numel} elements of "
                                     f"{st.dtype} ({st.numel * st.dtype.itemsize} bytes): a corrupt or crafted file")
                dt = st.dtype.newbyteorder(">") if big_endian else st.dtype
                arr = np.frombuffer(raw, dtype=dt, count=st.numel)
                st.data = arr.astype(st.dtype) if big_endian else arr
                storages[key] = st
            return storages[key]

        return _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), persistent_load).load()


def _read_legacy(path: str) -> Any:
    """The pre-1.6 format: magic, protocol, sys_info, the object pickle, the list
    of storage keys, then each storage as int64 element count + raw bytes."""
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
        if not isinstance(pid, tuple) or _as_str(pid[0]) != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        stype, root_key, _location, numel, view = pid[1:6]
        root_key = _as_str(root_key)
        if view is not None:
            raise pickle.UnpicklingError("storage views are not supported in weights files")
        if root_key not in storages:
            storages[root_key] = _Storage(_storage_type(stype).dtype, int(numel))
        return storages[root_key]

    def no_persistent_ids(pid):
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} in a header record")

    def plain(f):  # the header records are plain data (ints, a dict, a list)
        return _RestrictedUnpickler(f, no_persistent_ids).load()

    with open(path, "rb") as f:
        if plain(f) != _LEGACY_MAGIC:
            raise ValueError(f"{path!r} is neither a zip nor a legacy torch.save file (bad magic number)")
        if plain(f) != _LEGACY_PROTOCOL:
            raise ValueError(f"{path!r}: unsupported legacy torch.save protocol version")
        sys_info = plain(f)
        little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
        result = _RestrictedUnpickler(f, persistent_load).load()
        keys = plain(f)
        for key in keys:
            st = storages.get(_as_str(key))
            if st is None:
                raise ValueError(f"{path!r}: storage {key!r} is listed but no tensor uses it")
            count = np.frombuffer(f.read(8), dtype="<i8" if little else ">i8")[0]
            if int(count) != st.numel or st.numel < 0:
                raise ValueError(f"{path!r}: storage {key!r} holds {int(count)} elements but declares {st.numel}: "
                                 "a corrupt or crafted file")
            dt = st.dtype.newbyteorder("<" if little else ">")
            raw = f.read(int(count) * st.dtype.itemsize)
            if len(raw) != int(count) * st.dtype.itemsize:
                raise ValueError(f"{path!r} is truncated: storage {key!r} is short")
            st.data = np.frombuffer(raw, dtype=dt).astype(st.dtype)
    return result


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `torch.save`d state dict without torch and without running pickled code.

    Handles the zip format (torch >= 1.6) and the legacy format. Returns
    {key: np.ndarray}. Any pickle global other than OrderedDict, the tensor
    rebuild functions and the storage types raises `pickle.UnpicklingError`.
    """
    path = os.fspath(path)
    obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, expected a state dict")
    out = {}
    for k, v in obj.items():
        if isinstance(v, _LazyTensor):
            out[str(k)] = v.materialize()
    return out


def _torch_state_dict(path: str) -> dict[str, np.ndarray]:
    import torch  # optional: only when the caller has it

    if not _torch_version_ok(torch.__version__):
        raise ImportError(f"torch {torch.__version__} is too old to read untrusted weights (need >= "
                          f"{'.'.join(map(str, MIN_TORCH))}); upgrade it, or let the built-in reader read them")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, expected a state dict")
    return {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
            for k, v in obj.items() if isinstance(v, torch.Tensor)}


# torch.load(weights_only=True) of older versions trusts crafted tensor views and pickles.
MIN_TORCH = (2, 10)


def _torch_available() -> bool:
    """torch >= MIN_TORCH imports; an older torch is not used (the safe reader is)."""
    try:
        import torch
    except ImportError:
        return False
    return _torch_version_ok(torch.__version__)


def _torch_version_ok(version: str) -> bool:
    parts = re.match(r"(\d+)\.(\d+)", version)
    return bool(parts) and (int(parts[1]), int(parts[2])) >= MIN_TORCH


# --- Cache -------------------------------------------------------------------


def source_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a weights file; for an `.npz` written by `save_params`, that of the file it was
    converted from ('' if it does not say)."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as z:
            return str(z["__source_sha256__"]) if "__source_sha256__" in z.files else ""
    return _sha256(path)


def check_sha256(path: str | os.PathLike, expected: str = WEIGHTS_SHA256) -> str:
    """The weights' SHA-256 if it is `expected` ('any' accepts every file); else a ValueError naming
    both, so another file (a re-export, another network) is used only when the user says so."""
    digest = source_sha256(path)
    if expected != "any" and digest != expected.lower():
        raise ValueError(f"{os.fspath(path)!r} has SHA-256 {digest or '(unknown)'}, not that of pytorch-fid's "
                         f"{WEIGHTS_FILENAME} ({expected}); FIDs from other weights are not comparable. Pass "
                         f"--inception_sha256 {digest or 'any'} to use this file anyway")
    return digest


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with paths.path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_params(params: Params, path: str | os.PathLike, source_sha256: str = "") -> None:
    """Write converted params to `path` (.npz), atomically (temp file + rename)."""
    path = os.fspath(path)
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    flat["__source_sha256__"] = np.array(source_sha256)
    paths.write_npz(path, flat)  # readers never see a half-written file


def load_params(path: str | os.PathLike) -> Params:
    """Read params written by `save_params`, checking every shape."""
    path = os.fspath(path)
    with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as z:
        flat = {k: z[k] for k in z.files if not k.startswith("__")}
    expected = {"/".join(p): s for p, s in _param_shapes().items()}
    missing = sorted(set(expected) - set(flat))
    wrong = [k for k in expected if k in flat and tuple(flat[k].shape) != expected[k]]
    if missing or wrong:
        raise ValueError(
            f"{path!r} is not a converted FID Inception cache: missing {missing[:5]}, "
            f"wrong shapes {wrong[:5]}"
        )
    return traverse_util.unflatten_dict({k: flat[k].astype(np.float32) for k in expected}, sep="/")


def load(
    path: str | os.PathLike,
    cache_path: str | os.PathLike | None = None,
    *,
    use_torch: bool | None = None,
) -> Params:
    """FID Inception params from pytorch-fid's weights file.

    path: `pt_inception-2015-12-05-6726825d.pth` (the Inception3 state dict),
      a state dict of pytorch-fid's `InceptionV3` wrapper, or an `.npz` written
      by `save_params`.
    cache_path: optional `.npz`; if it exists and was converted from a file
      with the same SHA-256 it is read instead, else it is (re)written.
    use_torch: None = torch.load(weights_only=True) if torch imports, else the
      safe reader; False forces the safe reader.
    Returns nested {module: {'kernel' [kh, kw, I, O], 'scale' [O], 'bias' [O]}}
    of float32 NumPy arrays.
    """
    path = os.fspath(path)
    if not paths.isfile(path):
        raise FileNotFoundError(
            f"FID Inception weights not found at {path!r}; expected pytorch-fid's "
            f"{WEIGHTS_FILENAME} (download it from {WEIGHTS_URL})"
        )
    if path.endswith(".npz"):
        return load_params(path)
    if paths.is_remote(path):  # torch.load and the safe reader read local files; errors name the gs:// path
        with paths.local_file(path) as local:
            try:
                return load(local, cache_path, use_torch=use_torch)
            except ValueError as e:
                raise ValueError(str(e).replace(local, path)) from None
    digest = _sha256(path)
    if cache_path is not None and paths.isfile(cache_path):
        with np.load(io.BytesIO(paths.read_bytes(cache_path)), allow_pickle=False) as z:
            cached_digest = str(z["__source_sha256__"]) if "__source_sha256__" in z.files else ""
        if cached_digest == digest:
            return load_params(cache_path)
    if use_torch is None:
        use_torch = _torch_available()
    try:
        state = _torch_state_dict(path) if use_torch else read_torch_state_dict(path)
    except ImportError:
        raise
    except Exception as e:  # a corrupt or foreign file fails in many ways; name the file
        raise ValueError(
            f"cannot read {path!r} as a torch state dict ({type(e).__name__}: {e}); expected "
            f"pytorch-fid's {WEIGHTS_FILENAME}") from e
    params = params_from_state_dict(state, path)
    if cache_path is not None:
        save_params(params, cache_path, source_sha256=digest)
    return params


def init_random(seed: int = 0) -> Params:
    """Random params of the right shapes (tests and shape checks only)."""
    v = FIDInceptionV3().init(
        jax.random.PRNGKey(seed), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
    return jax.tree_util.tree_map(np.asarray, v["params"])


__all__ = [
    "FIDInceptionV3", "FEATURE_DIM", "WEIGHTS_FILENAME", "WEIGHTS_URL",
    "expected_torch_shapes", "features", "init_random", "load", "load_params",
    "params_from_state_dict", "preprocess", "read_torch_state_dict", "resize_bilinear",
    "save_params",
]
