"""Text conditioning for training and sampling, chosen by the stage config's `text` block:
precomputed embeddings (imagen_jax.encode_text), a real T5 checkpoint, or (no weights can ship
with the code) a tiny randomly initialised, frozen T5 with a SentencePiece vocabulary trained on the
embedded dataset's captions."""
import os

import jax.numpy as jnp

from imagen_jax.text import encoder as text_encoder
from imagen_jax.text import tokenizer as tokenizer_lib

DEMO_VOCAB_CAPTIONS = 4000


class TextConditioner:
    """`(captions) -> (embeddings [B, L, D], mask [B, L])` with a fixed L and D."""

    def __init__(self, fn, dim, max_length, description):
        self._fn, self.dim, self.max_length, self.description = fn, dim, max_length, description

    def __call__(self, captions):
        return self._fn(list(captions))


def demo_vocab(path_prefix, seed=0):
    """Trains (once) the SentencePiece vocabulary of the embedded shapes captions; deterministic."""
    model = path_prefix + ".model"
    if not os.path.exists(model):
        from imagen_jax.data import shapes
        captions = shapes.ShapesDataset(seed=seed).captions(DEMO_VOCAB_CAPTIONS)
        captions += shapes.held_out_prompts(64)
        tokenizer_lib.train_sentencepiece(captions, path_prefix, vocab_size=256)
    return model


def build(config, *, workdir=None, mesh=None):
    """The stage's text conditioner. A tiny random T5 needs `config.text.vocab` or a workdir to
    train its vocabulary into."""
    t = config.text
    text_dim = int(config.model.text_dim)
    if t.embeddings_dir:
        store = text_encoder.EmbeddingStore(t.embeddings_dir)

        def lookup(captions):
            emb, mask = store.lookup(captions)
            return jnp.asarray(emb), jnp.asarray(mask)

        emb, _ = lookup(store.captions[:1])
        cond = TextConditioner(lookup, emb.shape[-1], emb.shape[1], f"precomputed embeddings {t.embeddings_dir}")
    elif t.t5_checkpoint:
        if not t.vocab:
            raise ValueError("config.text.vocab (the T5 SentencePiece model) is required with text.t5_checkpoint")
        enc = text_encoder.TextEncoder.from_checkpoint(t.t5_checkpoint, t.vocab, max_length=t.max_length,
                                                       dtype=jnp.bfloat16, mesh=mesh)
        cond = TextConditioner(enc.encode, enc.dim, enc.max_length, f"T5 {t.t5_checkpoint}")
    else:
        vocab = t.vocab
        if not vocab:
            if workdir is None:
                raise ValueError("a tiny random T5 needs config.text.vocab or a workdir for its vocabulary")
            vocab = demo_vocab(os.path.join(workdir, "vocab", "shapes_spm"), seed=int(config.seed))
        tiny = dict(t.tiny_t5)
        vocab_size = tiny.pop("vocab_size", None)
        enc = text_encoder.TextEncoder.random(vocab, size="tiny", seed=0, max_length=t.max_length, mesh=mesh,
                                              **tiny)
        del vocab_size  # the tokenizer's size decides
        cond = TextConditioner(enc.encode, enc.dim, enc.max_length,
                               f"tiny RANDOMLY INITIALISED T5 (d_model={enc.dim}; no real T5 weights), vocab {vocab}")
    if cond.dim != text_dim:
        raise ValueError(f"text encoder width {cond.dim} ({cond.description}) does not match "
                         f"model.text_dim={text_dim}")
    return cond


def null_text(batch, max_length, dim, dtype=jnp.float32):
    """The unconditional prompt of classifier-free guidance: zero embeddings, all padding."""
    return jnp.zeros((batch, max_length, dim), dtype), jnp.zeros((batch, max_length), bool)


__all__ = ["TextConditioner", "build", "demo_vocab", "null_text"]
