"""Text conditioning for training and sampling, chosen by the stage config's `text` block:
precomputed embeddings (imagen_jax.encode_text), a real T5 checkpoint, or (no weights can ship
with the code) a tiny randomly initialised, frozen T5 with a SentencePiece vocabulary trained on the
embedded dataset's captions."""
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from imagen_jax import parallel, paths

from imagen_jax.text import encoder as text_encoder
from imagen_jax.text import store as store_lib
from imagen_jax.text import tokenizer as tokenizer_lib

DEMO_VOCAB_CAPTIONS = 4000


class TextConditioner:
    """`(captions) -> (embeddings [B, L, D], mask [B, L])` with a fixed L and D."""

    def __init__(self, fn, dim, max_length, description):
        self._fn, self.dim, self.max_length, self.description = fn, dim, max_length, description
        self.encoder = None  # the TextEncoder behind it, when there is one

    def __call__(self, captions):
        return self._fn(list(captions))

    def batch(self, captions):
        """A training batch's embeddings: as calling it, except that T5 run on the fly over
        several processes returns its global arrays (TextEncoder.encode(global_arrays=True)), which
        parallel.host_local_batch_to_global takes without a copy through the host."""
        if self.encoder is not None and self._fn == self.encoder.encode:
            return self.encoder.encode(list(captions), global_arrays=True)
        return self(captions)


def demo_vocab(path_prefix, seed=0):
    """Trains (once) the SentencePiece vocabulary of the embedded shapes captions; deterministic.
    Returns the path of the `.model` file to read. `path_prefix` may be gs://: SentencePiece's
    trainer writes local files only, so the model is trained in a temporary directory and copied
    through the path layer, atomically (readers never see half a file).

    On a multi-host run every host builds its text encoder here at once. Only process 0 writes
    `path_prefix.model`; another process that does not find it trains the same vocabulary (one
    thread, the same captions: the same pieces and scores) into a private temporary directory and
    reads that.
    No barrier: whether a host finds the file depends on when it looks, so a barrier taken only
    by the hosts that did not would pair with a different barrier on the others."""
    model = path_prefix + ".model"
    if paths.exists(model):
        return model
    from imagen_jax.data import shapes
    captions = shapes.ShapesDataset(seed=seed).captions(DEMO_VOCAB_CAPTIONS)
    captions += shapes.held_out_prompts(64)
    if jax.process_index() != 0:
        import atexit
        import shutil

        private = tempfile.mkdtemp(prefix="imagen_jax_vocab_")
        atexit.register(shutil.rmtree, private, ignore_errors=True)
        return tokenizer_lib.train_sentencepiece(captions, os.path.join(private, "spm"), vocab_size=256)
    with tempfile.TemporaryDirectory(prefix="imagen_jax_vocab_") as tmp:
        local = tokenizer_lib.train_sentencepiece(captions, os.path.join(tmp, "spm"), vocab_size=256)
        paths.makedirs(paths.path(model).parent)
        paths.write_bytes(model, paths.read_bytes(local))
    return model


class MissingEmbeddingError(ValueError):
    """A prompt is not in the stage's embedding store and no T5 is named to encode it."""


def _rules(config, mesh):
    # The stage's logical-axis rules shard T5 like the U-Net (FSDP over 'embed', tensor over heads/mlp).
    if mesh is None or "mesh" not in config or "rules" not in config.mesh:
        return None
    return parallel.rules_tuple(config.mesh.rules)


def _t5(t5_path, vocab, max_length, mesh, rules, dtype=jnp.bfloat16):
    if not vocab:
        raise ValueError(f"T5 {t5_path} needs its SentencePiece vocabulary: set config.text.vocab")
    return text_encoder.TextEncoder.from_checkpoint(t5_path, vocab, max_length=max_length, dtype=dtype,
                                                    mesh=mesh, rules=rules)


def _store_conditioner(t, mesh, rules, t5_path):
    """Embeddings from the store; prompts it lacks encoded by `t5_path` (checked to be the store's T5)."""
    store = store_lib.EmbeddingStore(t.embeddings_dir)
    vocab = t.vocab or store.meta.get("vocab", "")
    loaded = []

    def encoder():
        if not loaded:
            # Computed as encode_text's default computed the stored rows (float32 on CPU, else bfloat16).
            dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
            enc = _t5(t5_path, vocab, store.max_length, mesh, rules, dtype)
            want = store.meta.get("model_sha256")
            if want and store_lib.model_fingerprint(enc.config, enc.params) != want:
                raise ValueError(f"T5 {t5_path} is not the T5 that wrote the embedding store {t.embeddings_dir} "
                                 f"(that was {store.meta.get('t5') or 'another checkpoint'}); name that one")
            loaded.append(enc)
        return loaded[0]

    def lookup(captions):
        captions = list(captions)
        held = store.contains(captions)
        if held.all():
            emb, mask = store.lookup(captions)
            return jnp.asarray(emb), jnp.asarray(mask)
        missing = [c for c, h in zip(captions, held) if not h]
        if not t5_path:
            raise MissingEmbeddingError(
                f"prompt {missing[0]!r} is not in the embedding store {t.embeddings_dir} (text.embeddings_dir) "
                "and no T5 is named to encode it: set text.t5_checkpoint (and text.vocab) in the stage config, "
                "or pass --t5 PATH")
        emb = np.zeros((len(captions), store.max_length, store.dim), ml_dtypes.bfloat16)
        mask = np.zeros((len(captions), store.max_length), bool)
        if held.any():
            emb[held], mask[held] = store.lookup([c for c, h in zip(captions, held) if h])
        new_emb, new_mask = encoder().encode(missing)
        # Rounded like the stored rows, so a prompt gets the same input whether or not it was stored.
        emb[~held], mask[~held] = np.asarray(new_emb.astype(jnp.bfloat16)), np.asarray(new_mask)
        return jnp.asarray(emb), jnp.asarray(mask)

    desc = f"precomputed embeddings {t.embeddings_dir}" + (f"; prompts not in it encoded by T5 {t5_path}"
                                                          if t5_path else "")
    return TextConditioner(lookup, store.dim, store.max_length, desc)


def build(config, *, workdir=None, mesh=None, t5=None):
    """The stage's text conditioner. A tiny random T5 needs `config.text.vocab` or a workdir to
    train its vocabulary into. With a mesh, T5 is sharded over it by `config.mesh.rules`.

    With `text.embeddings_dir`, prompts missing from the store are encoded by the T5 `t5` (a --t5 flag)
    or `text.t5_checkpoint`; with neither they raise MissingEmbeddingError naming the prompt."""
    t = config.text
    text_dim = int(config.model.text_dim)
    rules = _rules(config, mesh)
    if t.embeddings_dir:
        cond = _store_conditioner(t, mesh, rules, t5 or t.t5_checkpoint)
    elif t5 or t.t5_checkpoint:
        t5_path = t5 or t.t5_checkpoint
        enc = _t5(t5_path, t.vocab, t.max_length, mesh, rules)
        cond = TextConditioner(enc.encode, enc.dim, enc.max_length, f"T5 {t5_path}")
        cond.encoder = enc
    else:
        vocab = t.vocab
        if not vocab:
            if workdir is None:
                raise ValueError("a tiny random T5 needs config.text.vocab or a workdir for its vocabulary")
            vocab = demo_vocab(paths.join(workdir, "vocab", "shapes_spm"), seed=int(config.seed))
        tiny = dict(t.tiny_t5)
        vocab_size = tiny.pop("vocab_size", None)
        enc = text_encoder.TextEncoder.random(vocab, size="tiny", seed=0, max_length=t.max_length, mesh=mesh,
                                              batch_axis=None, rules=rules, **tiny)
        del vocab_size  # the tokenizer's size decides
        cond = TextConditioner(enc.encode, enc.dim, enc.max_length,
                               f"tiny RANDOMLY INITIALISED T5 (d_model={enc.dim}; no real T5 weights), vocab {vocab}")
        cond.encoder = enc
    if cond.dim != text_dim:
        raise ValueError(f"text encoder width {cond.dim} ({cond.description}) does not match "
                         f"model.text_dim={text_dim}")
    return cond


def null_text(batch, max_length, dim, dtype=jnp.float32):
    """The unconditional prompt of classifier-free guidance: zero embeddings, all padding."""
    return jnp.zeros((batch, max_length, dim), dtype), jnp.zeros((batch, max_length), bool)


__all__ = ["MissingEmbeddingError", "TextConditioner", "build", "demo_vocab", "null_text"]
