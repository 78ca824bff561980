"""TextEncoder (prompts -> T5 embeddings, jitted and shardable) and the EmbeddingStore.

    enc = TextEncoder.from_checkpoint(t5_path, vocab_path, max_length=128, mesh=mesh)
    emb, mask = enc.encode(["a corgi on a skateboard", ...])   # [B, L, D], [B, L]

The EmbeddingStore (text/store.py, re-exported here) is the on-disk cache written by
`python -m imagen_jax.encode_text` so training can skip the encoder.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imagen_jax.text import t5
from imagen_jax.text.tokenizer import T5Tokenizer


def _encode_zeroed(config: t5.T5Config, params, ids, mask):
    emb = t5.T5Encoder(config).apply({"params": params}, ids, mask)
    if config.key_only_mask:
        return emb, mask  # HF semantics: pad rows are real outputs, which IF's U-Net reads
    # Padded positions carry no meaning (T5X masks them as queries too); zero them so they
    # are deterministic, compress well and cannot leak into a mean over length.
    return emb * mask[..., None].astype(emb.dtype), mask


@functools.lru_cache(maxsize=None)
def _jitted_encode(config: t5.T5Config, out_sharding: NamedSharding | None):
    # One compiled function per (config, output sharding), shared by TextEncoder instances.
    kwargs = {} if out_sharding is None else {"out_shardings": (out_sharding, out_sharding)}
    return jax.jit(functools.partial(_encode_zeroed, config), **kwargs)


class TextEncoder:
    """Tokenizer + T5 encoder + params behind one jitted `encode(prompts)`.

    Args:
      config, params: a T5 1.1 encoder (see `t5.load_checkpoint`, `t5.init_params`).
      tokenizer: a `T5Tokenizer`; its max_length fixes L.
      mesh: optional device mesh. The batch is sharded over `batch_axis`, padded up to a
        multiple of that axis size and stripped after. Params already placed on this mesh
        keep their sharding; others are replicated.
      batch_axis: mesh axis name or tuple of names that splits the batch. None: the mesh's
        'data' and 'fsdp' axes (imagen_jax.parallel's names), or all its axes if it has neither.
    """

    def __init__(self, config: t5.T5Config, params, tokenizer: T5Tokenizer, *,
                 mesh: Mesh | None = None, batch_axis: str | tuple[str, ...] | None = None):
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"tokenizer {tokenizer.vocab_path} has {tokenizer.vocab_size} pieces but "
                             f"the T5 embedding table only {config.vocab_size} rows")
        self.config = config
        self.tokenizer = tokenizer
        self.mesh = mesh
        params = t5._unwrap(params)
        if mesh is None:
            self.batch_multiple = 1
            self.params = jax.device_put(params)
            self._fn = _jitted_encode(config, None)
            self._data_sharding = None
        else:
            if batch_axis is None:
                batch_axis = tuple(a for a in ("data", "fsdp") if a in mesh.shape) or tuple(mesh.axis_names)
            axes = (batch_axis,) if isinstance(batch_axis, str) else tuple(batch_axis)
            missing = [a for a in axes if a not in mesh.shape]
            if missing:
                raise ValueError(f"batch_axis {missing} not in mesh axes {tuple(mesh.shape)}")
            # Rows per host must split evenly over this host's share of the batch axes.
            self.batch_multiple = max(1, int(np.prod([mesh.shape[a] for a in axes])) // jax.process_count())
            replicated = NamedSharding(mesh, P())

            def place(x):
                sharding = getattr(x, "sharding", None)
                if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
                    return x
                return jax.device_put(x, replicated)

            self.params = jax.tree_util.tree_map(place, params)
            self._data_sharding = NamedSharding(mesh, P(batch_axis))
            self._fn = _jitted_encode(config, self._data_sharding)

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    @property
    def dim(self) -> int:
        return self.config.d_model

    def encode(self, prompts: Sequence[str], *, global_arrays: bool = False) -> tuple[jax.Array, jax.Array]:
        """B prompts -> (embeddings [B, L, D] in config.dtype, mask bool [B, L]).

        Embeddings at padded positions (mask False) are zero, unless config.key_only_mask (HF
        semantics), where they are the encoder's outputs there.

        With a mesh over several processes each host passes its own prompts and gets its own rows
        back (host-local arrays). `global_arrays=True` keeps the encoder's global arrays instead
        (when the rows need no padding): each host's rows sit where
        jax.make_array_from_process_local_data puts that host's slice of a batch, so a training
        batch takes them as they are, with no copy through the host.
        """
        ids, mask = self.tokenizer.tokenize(prompts)
        return self.encode_tokens(ids, mask, global_arrays=global_arrays)

    def encode_tokens(self, ids: np.ndarray, mask: np.ndarray, *,
                      global_arrays: bool = False) -> tuple[jax.Array, jax.Array]:
        """ids int32 [B, L], mask bool [B, L] -> (embeddings [B, L, D], mask [B, L]); see encode."""
        ids = np.asarray(ids, np.int32)
        mask = np.asarray(mask, bool)
        b = ids.shape[0]
        pad = -b % self.batch_multiple
        if pad:  # whole rows of padding so every device gets the same share
            ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), np.int32)])
            mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
        if self._data_sharding is not None:
            # This host's rows (all rows with one process): each host encodes its own captions.
            ids = jax.make_array_from_process_local_data(self._data_sharding, ids)
            mask = jax.make_array_from_process_local_data(self._data_sharding, mask)
        emb, out_mask = self._fn(self.params, ids, mask)
        if global_arrays and not pad:
            return emb, out_mask
        if self._data_sharding is not None and jax.process_count() > 1:
            from jax.experimental import multihost_utils
            emb, out_mask = multihost_utils.global_array_to_host_local_array(
                (emb, out_mask), self.mesh, self._data_sharding.spec)
        if pad:
            emb, out_mask = emb[:b], out_mask[:b]
        return emb, out_mask

    __call__ = encode

    @classmethod
    def from_checkpoint(cls, t5_path: str, vocab_path: str, *, max_length: int = 128,
                        dtype: Any = jnp.float32, compute_dtype: Any = None,
                        mesh: Mesh | None = None, batch_axis: str | tuple[str, ...] | None = None,
                        rules=None, **config_overrides) -> "TextEncoder":
        """Load T5 weights (any format `t5.load_checkpoint` reads) and the SentencePiece vocab.

        With a mesh and `rules` (logical axis rules, see t5.DEFAULT_RULES), parameters are
        read straight into their shards; with a mesh and no rules they are replicated.
        """
        # A tokenizer object (e.g. hf_t5.JsonT5Tokenizer) is used as given.
        tokenizer = (vocab_path if isinstance(vocab_path, T5Tokenizer)
                     else T5Tokenizer(vocab_path, max_length=max_length))
        shardings = None
        if mesh is not None:
            shardings = (t5.sharding_fn(mesh, rules) if rules is not None
                         else NamedSharding(mesh, P()))
        config, params = t5.load_checkpoint(t5_path, dtype=dtype, shardings=shardings,
                                            compute_dtype=compute_dtype, **config_overrides)
        return cls(config, params, tokenizer, mesh=mesh, batch_axis=batch_axis)

    @classmethod
    def random(cls, tokenizer: T5Tokenizer | str, *, size: str = "tiny", seed: int = 0,
               max_length: int = 128, dtype: Any = jnp.float32, mesh: Mesh | None = None,
               batch_axis: str | tuple[str, ...] = "data", rules=None, **config_overrides) -> "TextEncoder":
        """A randomly initialised (frozen) T5 encoder, e.g. for demos without real weights.

        tokenizer: a T5Tokenizer or the path of a SentencePiece model (then `max_length`
        applies). The vocabulary is the tokenizer's, rounded up to a multiple of 128 as T5
        does. `size` picks t5.SIZES (default 'tiny': d_model 64, 2 layers); any T5Config
        field can be overridden (d_model=32, num_layers=1, ...). With a mesh and `rules` the
        parameters are sharded by those logical-axis rules, else replicated.
        """
        if not isinstance(tokenizer, T5Tokenizer):
            tokenizer = T5Tokenizer(tokenizer, max_length=max_length)
        vocab = -(-tokenizer.vocab_size // 128) * 128
        overrides = {"vocab_size": vocab, "dtype": dtype, "param_dtype": dtype, **config_overrides}
        config = t5.T5Config.from_size(size, **overrides)
        params = t5.init_params(config, jax.random.PRNGKey(seed))
        if mesh is not None and rules is not None:
            params = jax.device_put(t5._unwrap(params), t5.param_shardings(config, mesh, rules))
        return cls(config, params, tokenizer, mesh=mesh, batch_axis=batch_axis)


# --------------------------------------------------------------------------- embedding store

# The store lives in text/store.py; these names stay importable from here.
from imagen_jax.text.store import FORMAT as STORE_FORMAT  # noqa: E402
from imagen_jax.text.store import VERSION as STORE_VERSION  # noqa: E402
from imagen_jax.text.store import EmbeddingStore, captions_digest  # noqa: E402,F401
