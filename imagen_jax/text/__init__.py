"""Text side of Imagen: T5 1.1 encoder, its checkpoint readers, tokenizer, TextEncoder.

    from imagen_jax.text import t5
    config, params = t5.load_checkpoint(path)             # T5X dir/msgpack or HF safetensors
    hidden = t5.encode(config, params, token_ids, mask)   # [B, L, D]

    from imagen_jax.text import TextEncoder
    enc = TextEncoder.from_checkpoint(path, vocab_path)   # or TextEncoder.random(vocab_path)
    emb, mask = enc.encode(prompts)                       # [B, L, D], [B, L]
"""
from imagen_jax.text.checkpoints import CheckpointError, CheckpointNotFoundError
from imagen_jax.text.encoder import EmbeddingStore, TextEncoder
from imagen_jax.text.t5 import T5Config, encode, load_checkpoint
from imagen_jax.text.tokenizer import T5Tokenizer, train_sentencepiece

__all__ = [
    "CheckpointError", "CheckpointNotFoundError", "EmbeddingStore", "T5Config", "T5Tokenizer",
    "TextEncoder", "encode", "load_checkpoint", "train_sentencepiece",
]
