"""T5 1.1 encoder in Flax, numerically matching T5X's `t5x/examples/t5` network.

Public API (relied on by the rest of imagen_jax):

    config, params = load_checkpoint(path, dtype=jnp.float32)   # T5X dir / msgpack / HF safetensors
    hidden = encode(config, params, token_ids, mask)             # [B, L, D] after the final norm

The parameter tree is T5X's layout, so checkpoints map 1:1:

    {'token_embedder': {'embedding': [vocab, embed]},
     'encoder': {'relpos_bias': {'rel_embedding': [heads, relpos_buckets]},
                 'layers_i': {'pre_attention_layer_norm': {'scale': [embed]},
                              'attention': {'query'|'key'|'value': {'kernel': [embed, heads*kv]},
                                            'out': {'kernel': [heads*kv, embed]}},
                              'pre_mlp_layer_norm': {'scale': [embed]},
                              'mlp': {'wi_0'|'wi_1': {'kernel': [embed, mlp]},
                                      'wo': {'kernel': [mlp, embed]}}},
                 'encoder_norm': {'scale': [embed]}}}

T5 1.1 specifics kept exactly: no 1/sqrt(head_dim) logit scaling (T5 folds it into the
query initialisation), RMS norm without bias or mean subtraction (statistics in float32,
eps 1e-6), gated MLP gelu_tanh(x Wi0) * (x Wi1), and one bidirectional relative-position
bias table (32 buckets, max distance 128) shared by every layer.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

log = logging.getLogger(__name__)

Array = jax.Array
DType = Any

# Standard T5 1.1 sizes (Raffel et al. 2020, "T5.1.1" release); vocab 32128 is SentencePiece's
# 32000 pieces + 100 sentinels, rounded up to a multiple of 128.
SIZES: dict[str, dict[str, int]] = {
    "small": dict(d_model=512, num_heads=6, head_dim=64, d_ff=1024, num_layers=8),
    "base": dict(d_model=768, num_heads=12, head_dim=64, d_ff=2048, num_layers=12),
    "large": dict(d_model=1024, num_heads=16, head_dim=64, d_ff=2816, num_layers=24),
    "xl": dict(d_model=2048, num_heads=32, head_dim=64, d_ff=5120, num_layers=24),
    "xxl": dict(d_model=4096, num_heads=64, head_dim=64, d_ff=10240, num_layers=24),
    # Not a released size: a randomly initialised encoder for demos and tests.
    "tiny": dict(d_model=64, num_heads=4, head_dim=16, d_ff=128, num_layers=2),
}

# Logical axis -> mesh axis rules used when the caller gives none, for imagen_jax.parallel's
# (data, fsdp, tensor) mesh: tensor parallelism over heads/mlp/vocab, FSDP over embed. A rule
# whose mesh axis is absent or does not divide the dimension is skipped (see _mesh_spec).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("batch", "data"),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("relpos_buckets", None),
)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyperparameters of a T5 1.1 encoder. Frozen and hashable: it is a static jit argument."""

    vocab_size: int = 32128
    d_model: int = 512          # 'embed'
    num_heads: int = 6
    head_dim: int = 64          # 'kv'; heads * head_dim need not equal d_model (xl, xxl: it does)
    d_ff: int = 1024            # 'mlp'
    num_layers: int = 8
    relpos_buckets: int = 32
    relpos_max_distance: int = 128
    layer_norm_eps: float = 1e-6
    dtype: DType = jnp.float32        # compute dtype (bfloat16 on accelerators); norms stay float32
    param_dtype: DType = jnp.float32  # dtype of freshly initialised parameters
    float32_logits: bool = False      # T5X's float32_attention_logits (off in the T5 1.1 configs)
    # Hugging Face semantics (DeepFloyd IF): mask keys only, so padded rows attend to the real
    # tokens and hold meaningful values. T5X (the default) masks padded queries as well.
    key_only_mask: bool = False

    @classmethod
    def from_size(cls, name: str, **overrides) -> "T5Config":
        """Config of a named size ('small', 'base', 'large', 'xl', 'xxl', 'tiny')."""
        if name not in SIZES:
            raise ValueError(f"unknown T5 size {name!r}; expected one of {sorted(SIZES)}")
        return cls(**{**SIZES[name], **overrides})

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def size_name(self) -> str | None:
        """The named size whose shapes this config has, if any."""
        for name, dims in SIZES.items():
            if all(getattr(self, k) == v for k, v in dims.items()):
                return name
        return None


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int = 32,
                              max_distance: int = 128) -> np.ndarray:
    """Bidirectional T5 bucket of each (query, key) pair: int32 [q_len, k_len] in [0, num_buckets).

    Half of the buckets hold keys at or before the query, half keys after it. Within a half,
    the first quarter are exact distances and the rest are log-spaced up to max_distance;
    farther keys share the last bucket. Computed on the host in float32 with T5X's epsilon so
    bucket boundaries (e.g. distance 16, 32, 64) fall exactly where T5X puts them.
    """
    rel = np.arange(k_len, dtype=np.int32)[None, :] - np.arange(q_len, dtype=np.int32)[:, None]
    half = num_buckets // 2
    exact = half // 2
    bucket = np.where(rel > 0, half, 0).astype(np.int32)
    dist = np.abs(rel)
    eps = np.finfo(np.float32).eps
    log_ratio = np.log(dist.astype(np.float32) / np.float32(exact) + eps) / np.float32(
        np.log(max_distance / exact))
    far = exact + (log_ratio * np.float32(half - exact)).astype(np.int32)
    far = np.minimum(far, half - 1)
    return bucket + np.where(dist < exact, dist, far).astype(np.int32)


# --------------------------------------------------------------------------- layers

# Initialisers follow T5X so that a random model has T5's activation scales.
_embed_init = nn.initializers.normal(stddev=1.0)
_dense_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
_attn_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
_relpos_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def _query_init(head_dim: int) -> Callable:
    # T5 has no 1/sqrt(d) in attention; the scale is folded into the query kernel at init.
    def init(key, shape, dtype=jnp.float32):
        return (_attn_init(key, shape, dtype) / np.sqrt(head_dim)).astype(dtype)
    return init


class Dense(nn.Module):
    """Bias-free linear map [..., in] -> [..., features], kernel [in, features]."""

    features: int
    kernel_axes: tuple[str, str]
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    kernel_init: Callable = _dense_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                            (x.shape[-1], self.features), self.param_dtype)
        x = jnp.asarray(x, self.dtype)
        kernel = jnp.asarray(kernel, self.dtype)
        return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


class RMSNorm(nn.Module):
    """T5 layer norm: x / sqrt(mean(x^2) + eps) * scale, statistics in float32, no bias."""

    eps: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        x = jnp.asarray(x, jnp.float32)
        y = x * lax.rsqrt(jnp.mean(lax.square(x), axis=-1, keepdims=True) + self.eps)
        # The scale multiply happens in the compute dtype, as in T5X.
        return jnp.asarray(y, self.dtype) * jnp.asarray(scale, self.dtype)


class Embedding(nn.Module):
    """Token ids [B, L] -> vectors [B, L, D] in the compute dtype."""

    vocab_size: int
    d_model: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, ids: Array) -> Array:
        table = self.param("embedding", nn.with_logical_partitioning(_embed_init, ("vocab", "embed")),
                           (self.vocab_size, self.d_model), self.param_dtype)
        x = jnp.take(jnp.asarray(table, self.dtype), ids.astype(jnp.int32), axis=0)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class RelativePositionBias(nn.Module):
    """Attention logit bias [1, H, L, L] from the shared table rel_embedding [H, buckets]."""

    num_heads: int
    num_buckets: int
    max_distance: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, length: int) -> Array:
        table = self.param("rel_embedding",
                           nn.with_logical_partitioning(_relpos_init, ("heads", "relpos_buckets")),
                           (self.num_heads, self.num_buckets), self.param_dtype)
        buckets = relative_position_buckets(length, length, self.num_buckets, self.max_distance)
        bias = jnp.take(jnp.asarray(table, self.dtype), jnp.asarray(buckets), axis=1)  # [H, L, L]
        return bias[None]


class Attention(nn.Module):
    """Multi-head self-attention without logit scaling. [B, L, D] -> [B, L, D]."""

    num_heads: int
    head_dim: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    float32_logits: bool = False

    @nn.compact
    def __call__(self, x: Array, bias: Array) -> Array:
        """x [B, L, D]; bias [B or 1, H, L, L] (padding mask and position bias, already summed)."""
        b, l, d = x.shape
        inner = self.num_heads * self.head_dim
        proj = functools.partial(Dense, inner, ("embed", "heads"), self.dtype, self.param_dtype)
        # The joined [heads*kv] kernel axis is labelled 'heads': it is head-major, so sharding
        # it over a mesh axis that divides num_heads splits whole heads.
        q = proj(kernel_init=_query_init(self.head_dim), name="query")(x)
        k = proj(kernel_init=_attn_init, name="key")(x)
        v = proj(kernel_init=_attn_init, name="value")(x)
        split = lambda t: nn.with_logical_constraint(
            t.reshape(b, l, self.num_heads, self.head_dim), ("batch", "length", "heads", "kv"))
        q, k, v = split(q), split(k), split(v)
        if self.float32_logits:
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        logits = logits + bias.astype(logits.dtype)
        weights = jax.nn.softmax(logits).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, l, inner)
        return Dense(d, ("heads", "embed"), self.dtype, self.param_dtype, _attn_init, name="out")(out)


class GatedMlp(nn.Module):
    """T5 1.1 feed-forward: (gelu_tanh(x Wi0) * x Wi1) Wo. [B, L, D] -> [B, L, D]."""

    d_ff: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = nn.gelu(dense(self.d_ff, ("embed", "mlp"), name="wi_0")(x), approximate=True)
        h = gate * dense(self.d_ff, ("embed", "mlp"), name="wi_1")(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), name="wo")(h)


class EncoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x: Array, bias: Array) -> Array:
        cfg = self.config
        norm = functools.partial(RMSNorm, cfg.layer_norm_eps, cfg.dtype, cfg.param_dtype)
        h = norm(name="pre_attention_layer_norm")(x)
        x = x + Attention(cfg.num_heads, cfg.head_dim, cfg.dtype, cfg.param_dtype,
                          cfg.float32_logits, name="attention")(h, bias)
        h = norm(name="pre_mlp_layer_norm")(x)
        return x + GatedMlp(cfg.d_ff, cfg.dtype, cfg.param_dtype, name="mlp")(h)


class Encoder(nn.Module):
    """Layer stack on embedded tokens: [B, L, D] + mask [B, L] -> [B, L, D]."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        cfg = self.config
        length = x.shape[1]
        pos_bias = RelativePositionBias(cfg.num_heads, cfg.relpos_buckets, cfg.relpos_max_distance,
                                        cfg.dtype, cfg.param_dtype, name="relpos_bias")(length)
        # T5X masks a pair unless both query and key are real tokens. Padded queries thus see
        # every key masked: their outputs are meaningless (and differ from HF's) but finite.
        # HF (key_only_mask) masks keys only.
        pair = mask[:, None, None, :]
        if not cfg.key_only_mask:
            pair = pair & mask[:, None, :, None]
        # Summed in float32 and floored at the compute dtype's minimum: a fixed -1e10 becomes -inf
        # in float16, and a row of -inf (a padded T5X query) makes the softmax NaN.
        low = float(jnp.finfo(cfg.dtype).min)
        mask_bias = jnp.where(pair, 0.0, max(-1e10, low))
        bias = jnp.maximum(mask_bias + pos_bias.astype(jnp.float32), low).astype(cfg.dtype)  # [B, H, L, L]
        for i in range(cfg.num_layers):
            x = EncoderLayer(cfg, name=f"layers_{i}")(x, bias)
        return RMSNorm(cfg.layer_norm_eps, cfg.dtype, cfg.param_dtype, name="encoder_norm")(x)


class T5Encoder(nn.Module):
    """Token ids [B, L] and mask [B, L] -> last hidden states [B, L, D] (after encoder_norm)."""

    config: T5Config

    @nn.compact
    def __call__(self, token_ids: Array, mask: Array | None = None) -> Array:
        cfg = self.config
        if mask is None:
            mask = token_ids > 0  # T5's pad id is 0
        x = Embedding(cfg.vocab_size, cfg.d_model, cfg.dtype, cfg.param_dtype,
                      name="token_embedder")(token_ids)
        return Encoder(cfg, name="encoder")(x, mask.astype(bool))


# --------------------------------------------------------------------------- functional API


def _unwrap(params: Mapping) -> Mapping:
    # Accept both the bare tree and flax's {'params': tree}.
    if set(params.keys()) == {"params"}:
        return params["params"]
    return params


@functools.partial(jax.jit, static_argnums=0)
def _encode(config: T5Config, params, token_ids, mask):
    return T5Encoder(config).apply({"params": params}, token_ids, mask)


def encode(config: T5Config, params: Mapping, token_ids, mask=None) -> Array:
    """Run the encoder: token_ids int [B, L], mask bool [B, L] (None: ids > 0).

    Returns the last hidden states [B, L, d_model] in config.dtype, after the final norm.
    Positions where mask is False hold values of no meaning (T5X masks padded queries too).
    """
    token_ids = jnp.asarray(token_ids)
    if token_ids.ndim != 2:
        raise ValueError(f"token_ids must be [batch, length], got shape {token_ids.shape}")
    if mask is None:
        mask = token_ids > 0
    mask = jnp.asarray(mask, bool)
    if mask.shape != token_ids.shape:
        raise ValueError(f"mask shape {mask.shape} differs from token_ids shape {token_ids.shape}")
    return _encode(config, _unwrap(params), token_ids, mask)


def init_params(config: T5Config, rng: Array | int = 0) -> dict:
    """Random T5X-initialised parameters (plain arrays, config.param_dtype)."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    return nn.unbox(_init(config, rng)["params"])


@functools.partial(jax.jit, static_argnums=0)
def _init(config: T5Config, rng):
    return T5Encoder(config).init(rng, jnp.zeros((1, 1), jnp.int32))


def logical_axes(config: T5Config) -> dict:
    """PartitionSpec of logical axis names for every parameter (same tree as the params)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(lambda: T5Encoder(config).init(jax.random.PRNGKey(0), ids))
    return nn.get_partition_spec(abstract)["params"]


def _mesh_spec(logical: tuple, shape: tuple[int, ...], mesh: jax.sharding.Mesh,
               rules) -> jax.sharding.PartitionSpec:
    """Logical axis names -> PartitionSpec on `mesh`, first usable rule per dim (as flax).

    A rule is skipped when its mesh axis is missing from the mesh, already used by another
    dim, or does not divide the dim, so one rule set serves any mesh and any model size.
    """
    used: set[str] = set()
    mesh_axes = []
    for dim, name in zip(shape, logical):
        chosen = None
        for logical_name, target in rules:
            if logical_name != name or target is None:
                continue
            names = (target,) if isinstance(target, str) else tuple(target)
            if not all(n in mesh.shape and n not in used for n in names):
                continue
            if dim % int(np.prod([mesh.shape[n] for n in names])):
                continue
            chosen = target
            used.update(names)
            break
        mesh_axes.append(chosen)
    return jax.sharding.PartitionSpec(*mesh_axes)


@functools.lru_cache(maxsize=None)
def _logical_axes_by_key() -> dict[str, tuple]:
    # Read the names off the flax modules once (a one-layer model has every kind of param).
    flat = jax.tree_util.tree_flatten_with_path(
        logical_axes(T5Config(num_layers=1)),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    return {"/".join(p.key for p in path): tuple(spec) for path, spec in flat}


def sharding_fn(mesh: jax.sharding.Mesh, rules=None) -> Callable:
    """A `(key, shape, dtype=None) -> NamedSharding` for `load_checkpoint(shardings=...)`.

    Works before the config is known: the logical axes come from the parameter's key.
    """
    rules = tuple(DEFAULT_RULES if rules is None else rules)
    table = _logical_axes_by_key()

    def fn(key: str, shape, dtype=None) -> jax.sharding.NamedSharding:
        generic = re.sub(r"layers_\d+", "layers_0", key)
        if generic not in table:
            raise ValueError(f"no logical axes known for parameter {key!r}")
        return jax.sharding.NamedSharding(mesh, _mesh_spec(table[generic], tuple(shape), mesh, rules))

    return fn


def param_shardings(config: T5Config, mesh: jax.sharding.Mesh, rules=None) -> dict:
    """NamedSharding per parameter (same tree as the params) from logical axis rules."""
    fn = sharding_fn(mesh, rules)
    flat, treedef = jax.tree_util.tree_flatten_with_path(init_params_abstract(config))
    return jax.tree_util.tree_unflatten(
        treedef, [fn("/".join(p.key for p in path), leaf.shape) for path, leaf in flat])


def init_params_abstract(config: T5Config):
    """Parameter shapes and dtypes without allocating (a tree of ShapeDtypeStruct)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(lambda: T5Encoder(config).init(jax.random.PRNGKey(0), ids))
    return nn.unbox(abstract["params"])


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], **overrides) -> T5Config:
    """Infer a T5Config from T5X-layout parameter shapes keyed 'encoder/layers_0/mlp/wi_0/kernel'.

    Raises ValueError when the shapes are not those of one consistent T5 1.1 encoder.
    """
    def get(key):
        if key not in shapes:
            raise ValueError(f"missing parameter {key!r}")
        return tuple(shapes[key])

    vocab, d_model = get("token_embedder/embedding")
    heads, buckets = get("encoder/relpos_bias/rel_embedding")
    layer_ids = sorted(int(k.split("/")[1][len("layers_"):]) for k in shapes
                       if k.startswith("encoder/layers_") and k.endswith("/attention/query/kernel"))
    if not layer_ids:
        raise ValueError("no encoder layers (encoder/layers_0/...) found")
    if layer_ids != list(range(len(layer_ids))):
        raise ValueError(f"encoder layers are not numbered 0..n-1: {layer_ids}")
    inner = get("encoder/layers_0/attention/query/kernel")[1]
    d_ff = get("encoder/layers_0/mlp/wi_0/kernel")[1]
    if inner % heads:
        raise ValueError(f"attention width {inner} is not a multiple of the {heads} heads")
    config = T5Config(vocab_size=vocab, d_model=d_model, num_heads=heads, head_dim=inner // heads,
                      d_ff=d_ff, num_layers=len(layer_ids), relpos_buckets=buckets)
    config = dataclasses.replace(config, **overrides)
    expected = expected_shapes(config)
    wrong = [f"{k}: {get(k)} (expected {v})" for k, v in expected.items() if get(k) != v]
    if wrong:
        raise ValueError("inconsistent parameter shapes: " + "; ".join(wrong[:5]))
    return config


def expected_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
    """Every parameter's T5X-layout key ('encoder/layers_0/mlp/wo/kernel') and shape."""
    d, inner, ff = config.d_model, config.inner_dim, config.d_ff
    shapes = {
        "token_embedder/embedding": (config.vocab_size, d),
        "encoder/relpos_bias/rel_embedding": (config.num_heads, config.relpos_buckets),
        "encoder/encoder_norm/scale": (d,),
    }
    for i in range(config.num_layers):
        p = f"encoder/layers_{i}/"
        shapes.update({
            p + "pre_attention_layer_norm/scale": (d,),
            p + "attention/query/kernel": (d, inner),
            p + "attention/key/kernel": (d, inner),
            p + "attention/value/kernel": (d, inner),
            p + "attention/out/kernel": (inner, d),
            p + "pre_mlp_layer_norm/scale": (d,),
            p + "mlp/wi_0/kernel": (d, ff),
            p + "mlp/wi_1/kernel": (d, ff),
            p + "mlp/wo/kernel": (ff, d),
        })
    return shapes


def load_checkpoint(path: str, dtype: DType = jnp.float32, *, shardings=None,
                    compute_dtype: DType | None = None, **config_overrides) -> tuple[T5Config, dict]:
    """Load a T5 1.1 encoder from a T5X checkpoint dir, its msgpack file, or HF safetensors.

    Args:
      path: T5X `checkpoint_N/` directory (legacy msgpack + zarr/tensorstore layout), the
        `checkpoint` msgpack file itself (arrays inline), a `*.safetensors` file, a sharded
        `model.safetensors.index.json`, or a directory holding either HF form. `gs://` is
        accepted for T5X checkpoints.
      dtype: dtype of the returned parameters (cast on the host while reading).
      shardings: None (default device), one `jax.sharding.Sharding` for all parameters, a
        tree of shardings matching the params (e.g. `param_shardings(...)`), or a callable
        `(key, shape, dtype) -> Sharding` with keys like 'encoder/layers_0/mlp/wo/kernel'.
        Each device reads only its own slice (`jax.make_array_from_callback`).
      compute_dtype: config.dtype for the forward pass; defaults to `dtype`.
      **config_overrides: T5Config fields not inferable from shapes (relpos_max_distance...).

    Returns:
      (config, params): params in the T5X layout described in this module's docstring.

    Raises:
      CheckpointError (a ValueError; CheckpointNotFoundError is also a FileNotFoundError)
      naming the path and what was expected. Nothing is returned half-loaded.
    """
    from imagen_jax.text import checkpoints

    sources = checkpoints.open_encoder_arrays(path)
    # Settings the shapes cannot tell (activation, eps, relative-attention buckets and distance),
    # from the configuration stored with the checkpoint; explicit overrides win.
    config_overrides = {**checkpoints.model_hyperparameters(path), **config_overrides}
    try:
        config = config_from_shapes({k: s.shape for k, s in sources.items()},
                                    dtype=compute_dtype or dtype, param_dtype=dtype,
                                    **config_overrides)
    except ValueError as e:
        raise checkpoints.CheckpointError(
            f"{path}: not a T5 1.1 encoder checkpoint ({e})") from None
    expected = expected_shapes(config)
    extra = sorted(set(sources) - set(expected))
    if extra:
        log.warning("%s: ignoring %d encoder arrays T5 1.1 does not use, e.g. %s",
                    path, len(extra), extra[:3])
    params = checkpoints.materialize({k: sources[k] for k in expected}, dtype, shardings)
    return config, params
