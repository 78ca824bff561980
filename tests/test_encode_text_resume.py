"""encode_text resume: the fingerprint does not depend on --dtype (a run started on CPU in float32
resumes on an accelerator in bfloat16), and another vocabulary is refused."""
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from imagen_jax import encode_text
from imagen_jax.text import checkpoints, t5
from imagen_jax.text.encoder import TextEncoder
from imagen_jax.text.tokenizer import train_sentencepiece

CAPTIONS = [f"a {c} {t} {p}" for c in ["red", "blue", "green"]
            for t in ["cat", "dog", "boat"] for p in ["at night", "in the sun"]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fixtures_dir):
    d = tmp_path_factory.mktemp("sp")
    vocab = train_sentencepiece(CAPTIONS, str(d / "a"), vocab_size=80)
    other = train_sentencepiece(CAPTIONS[::-1] + ["zebra xylophone quartz"], str(d / "b"), vocab_size=80)
    return os.path.join(fixtures_dir, "t5x", "test_t5_tiny.checkpoint_0"), vocab, other


def test_fingerprint_independent_of_dtype(setup, tmp_path):
    t5_path, vocab, _ = setup
    # A final-norm scale that bfloat16 cannot hold exactly (the fixture's can), so that a float32 and
    # a bfloat16 load really differ in the bytes the fingerprint reads.
    _, params = t5.load_checkpoint(t5_path)
    scale = np.asarray(params["encoder"]["encoder_norm"]["scale"], np.float32) * np.float32(1.001)
    assert (scale.astype(ml_dtypes.bfloat16).astype(np.float32) != scale).any()
    params["encoder"]["encoder_norm"]["scale"] = scale
    t5_path = checkpoints.save_safetensors(params, str(tmp_path / "t5.safetensors"))[0]
    enc32 = TextEncoder.from_checkpoint(t5_path, vocab, max_length=16, dtype=jnp.float32)
    enc16 = TextEncoder.from_checkpoint(t5_path, vocab, max_length=16, dtype=jnp.bfloat16)
    assert encode_text._model_fingerprint(enc32) == encode_text._model_fingerprint(enc16)
    out = str(tmp_path / "emb")
    encode_text.encode_captions(enc32, CAPTIONS[:6], out, shard_size=4, progress=False)
    # Resumed in bfloat16 (an accelerator's default): accepted, nothing re-encoded is refused.
    index = encode_text.encode_captions(enc16, CAPTIONS[:6], out, shard_size=4, progress=False)
    assert index["count"] == 6 and index["vocab_sha256"]


def test_other_vocabulary_refused_on_resume(setup, tmp_path):
    t5_path, vocab, other = setup
    out = str(tmp_path / "emb")
    encode_text.encode_captions(TextEncoder.from_checkpoint(t5_path, vocab, max_length=16), CAPTIONS[:6], out,
                                shard_size=4, progress=False)
    with pytest.raises(ValueError, match="vocab_sha256"):
        encode_text.encode_captions(TextEncoder.from_checkpoint(t5_path, other, max_length=16), CAPTIONS[:6],
                                    out, shard_size=4, progress=False)
