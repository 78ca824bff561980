"""DeepFloyd IF's text conditioning: T5-v1_1-XXL with Hugging Face semantics, read from a diffusers
pipeline directory (`text_encoder/` safetensors, `tokenizer/spiece.model` or, as transformers >= 5
saves it, `tokenizer/tokenizer.json` read through the `tokenizers` package).

    enc = load_encoder(stage_dir)                  # a TextEncoder: 77 tokens, key-only masking
    emb, neg = encode_with_negative(enc, prompts)  # [B, 77, D] each; neg = T5 of the empty prompt

What differs from the Imagen (T5X) convention, each as diffusers' IF pipelines do it: prompts are
`lower().strip()`-ed (diffusers' fallback when caption cleaning's bs4/ftfy are absent, and what
`encode_prompt(clean_caption=False)` does), padded rows are kept (keys are masked, queries are not),
and the unconditional embedding is the encoder's output for "" rather than zeros.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from imagen_jax import paths
from imagen_jax.text.encoder import TextEncoder
from imagen_jax.text.tokenizer import EOS_ID, PAD_ID, T5Tokenizer

MAX_LENGTH = 77  # diffusers' IF pipelines tokenize to 77 (pipeline_if.py encode_prompt)


class TextLayoutError(ValueError):
    pass


def clean_prompt(prompt: str) -> str:
    return prompt.lower().strip()


def _t5_overrides(config_path: str) -> dict:
    """T5Config fields the weights' shapes do not show, from HF's text_encoder/config.json."""
    if not os.path.isfile(config_path):
        return {}
    with open(config_path) as f:
        cfg = json.load(f)
    act = cfg.get("feed_forward_proj", "gated-gelu")
    if act != "gated-gelu":
        raise TextLayoutError(f"{config_path}: feed_forward_proj={act!r}; expected a T5 1.1 encoder ('gated-gelu')")
    out = {}
    if "relative_attention_max_distance" in cfg:
        out["relpos_max_distance"] = int(cfg["relative_attention_max_distance"])
    if "layer_norm_epsilon" in cfg:
        out["layer_norm_eps"] = float(cfg["layer_norm_epsilon"])
    return out


def text_paths(stage_dir: str) -> tuple[str, str] | None:
    """(text_encoder dir, spiece.model or tokenizer.json path) of a pipeline directory, None when it has neither
    (IF stage II downloads may leave the encoder out). Half a layout is an error."""
    enc_dir = os.path.join(stage_dir, "text_encoder")
    tok_dir = os.path.join(stage_dir, "tokenizer")
    if not os.path.isdir(enc_dir) and not os.path.isdir(tok_dir):
        return None
    if not os.path.isdir(enc_dir):
        raise TextLayoutError(f"{enc_dir}: missing; expected the T5 encoder's config.json and *.safetensors "
                              "beside tokenizer/")
    weights = [f for f in glob.glob(os.path.join(enc_dir, "*.safetensors")) if ".8bit." not in os.path.basename(f)]
    if not weights:
        bins = glob.glob(os.path.join(enc_dir, "*.bin"))
        what = ("only PyTorch .bin weights, which are never unpickled here; download the *.safetensors "
                "files (model.safetensors.index.json + shards, or the .fp16 variant)") if bins else \
            "no *.safetensors weights (model.safetensors.index.json + model-*.safetensors)"
        raise TextLayoutError(f"{enc_dir}: {what}")
    vocab = os.path.join(tok_dir, "spiece.model")
    if os.path.isfile(vocab):
        return enc_dir, vocab
    # transformers >= 5 saves a T5 tokenizer as tokenizer.json alone (no spiece.model).
    tok_json = os.path.join(tok_dir, "tokenizer.json")
    if not os.path.isfile(tok_json):
        raise TextLayoutError(f"{vocab}: missing, and no {tok_json} either; expected T5's SentencePiece model "
                              "(IF's tokenizer/spiece.model) or a Hugging Face tokenizer.json")
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise TextLayoutError(f"{vocab}: missing; {tok_json} is there, but reading it needs the `tokenizers` "
                              "package (pip install tokenizers), or put IF's spiece.model beside it") from None
    return enc_dir, tok_json


class JsonT5Tokenizer(T5Tokenizer):
    """T5Tokenizer (same conventions: pieces, then EOS 1, then pad 0; over-long prompts cut, counted)
    whose pieces come from a Hugging Face tokenizer.json through the `tokenizers` package (Rust; no
    torch), for tokenizer/ directories that have no spiece.model. Pieces are those of the fast
    tokenizer without special tokens; EOS is appended here, as T5's template processor would."""

    def __init__(self, path, max_length: int = MAX_LENGTH):
        import tokenizers

        path = os.fspath(path)
        try:
            tok = tokenizers.Tokenizer.from_str(paths.read_text(path))
        except Exception as e:
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
        pad, eos = tok.token_to_id("<pad>"), tok.token_to_id("</s>")
        if (pad, eos) != (PAD_ID, EOS_ID):
            raise ValueError(f"{path}: <pad>/</s> ids are {pad}/{eos}; T5 needs pad {PAD_ID} and eos {EOS_ID}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (one piece + EOS), got {max_length}")
        self._sp = _JsonPieces(tok)
        self.vocab_path = path
        self.max_length = int(max_length)
        self.last_num_truncated = 0
        self.num_truncated = 0


class _JsonPieces:
    """The three SentencePieceProcessor calls T5Tokenizer makes, answered by a `tokenizers.Tokenizer`."""

    def __init__(self, tok):
        self._tok = tok

    def EncodeAsIds(self, prompts):  # noqa: N802 (SentencePiece's name)
        return [e.ids for e in self._tok.encode_batch(list(prompts), add_special_tokens=False)]

    def DecodeIds(self, ids):  # noqa: N802
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def GetPieceSize(self):  # noqa: N802
        return self._tok.get_vocab_size(with_added_tokens=True)


def load_encoder(stage_dir: str, *, dtype: Any = jnp.float32, compute_dtype: Any = None, mesh=None,
                 rules=None) -> TextEncoder:
    """IF's T5 encoder from a pipeline directory. Weights: the fp32 shard set if present, else the
    fp16 one (whose `wo` tensors are float32), each cast to `dtype` on read; `*.8bit.*` is skipped."""
    text_layout = text_paths(stage_dir)
    if text_layout is None:
        raise TextLayoutError(f"{stage_dir}: no text_encoder/ or tokenizer/ (the T5 encoder of IF stage I)")
    enc_dir, vocab = text_layout
    overrides = _t5_overrides(os.path.join(enc_dir, "config.json"))
    if vocab.endswith(".json"):
        vocab = JsonT5Tokenizer(vocab, max_length=MAX_LENGTH)
    return TextEncoder.from_checkpoint(enc_dir, vocab, max_length=MAX_LENGTH, dtype=dtype,
                                       compute_dtype=compute_dtype, mesh=mesh, rules=rules,
                                       key_only_mask=True, **overrides)


def encode_with_negative(encoder: TextEncoder, prompts: Sequence[str]):
    """B prompts -> (embeddings [B, L, D], negative embeddings [B, L, D]) as float32 numpy; the
    negative is T5("") broadcast (diffusers' default negative prompt)."""
    if not encoder.config.key_only_mask:
        raise ValueError("IF conditioning needs an encoder with key_only_mask (HF semantics); see load_encoder")
    prompts = [clean_prompt(p) for p in prompts]
    emb, _ = encoder.encode(prompts)
    neg, _ = encoder.encode([""])
    emb = np.asarray(emb, np.float32)
    return emb, np.broadcast_to(np.asarray(neg, np.float32), emb.shape).copy()
