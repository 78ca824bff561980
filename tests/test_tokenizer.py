"""T5Tokenizer and train_sentencepiece, with a SentencePiece model trained here."""
import logging

import numpy as np
import pytest
import sentencepiece as spm

from imagen_jax.text.tokenizer import EOS_ID, PAD_ID, T5Tokenizer, train_sentencepiece

COLORS = ["red", "blue", "green", "yellow", "black", "white"]
THINGS = ["cat", "dog", "car", "bird", "house", "tree", "boat"]
PLACES = ["on the grass", "in the snow", "near a lake", "under a bridge"]
CAPTIONS = [f"a photo of a {c} {t} {p}" for c in COLORS for t in THINGS for p in PLACES]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return train_sentencepiece(CAPTIONS, str(tmp_path_factory.mktemp("sp") / "demo"), vocab_size=120)


@pytest.fixture(scope="module")
def sp(vocab):
    proc = spm.SentencePieceProcessor()
    proc.Load(vocab)
    return proc


def test_trained_model_has_t5_special_ids(sp):
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert [sp.IdToPiece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert 10 < sp.GetPieceSize() <= 120


def test_ids_end_in_eos_then_pad(vocab, sp):
    tok = T5Tokenizer(vocab, max_length=32)
    prompts = ["a red cat on the grass", "a white boat", ""]
    ids, mask = tok.tokenize(prompts)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (3, 32)
    for row, prompt in enumerate(prompts):
        pieces = sp.EncodeAsIds(prompt)
        n = len(pieces)
        assert ids[row, :n].tolist() == pieces
        assert ids[row, n] == EOS_ID
        assert (ids[row, n + 1:] == PAD_ID).all()
        assert mask[row].tolist() == [True] * (n + 1) + [False] * (31 - n)
    assert ids[2, 0] == EOS_ID and mask[2].sum() == 1  # empty prompt: just EOS
    assert tok.last_num_truncated == 0
    assert tok.decode(ids) == ["a red cat on the grass", "a white boat", ""]


def test_truncation_is_counted_and_logged(vocab, sp, caplog):
    tok = T5Tokenizer(vocab, max_length=8)
    long = "a photo of a yellow house near a lake under a bridge"
    assert len(sp.EncodeAsIds(long)) > 7
    with caplog.at_level(logging.WARNING, logger="imagen_jax.text.tokenizer"):
        ids, mask = tok(["a cat", long, long + " again"])
    assert tok.last_num_truncated == 2 and tok.num_truncated == 2
    assert "2 of 3 prompts" in caplog.text and "truncated" in caplog.text
    assert ids[1, :7].tolist() == sp.EncodeAsIds(long)[:7]
    assert ids[1, 7] == EOS_ID and mask[1].all()  # EOS kept at the last position
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imagen_jax.text.tokenizer"):
        tok(["a cat"])
    assert tok.last_num_truncated == 0 and tok.num_truncated == 2 and caplog.text == ""


def test_default_max_length_and_single_string(vocab):
    tok = T5Tokenizer(vocab)
    ids, mask = tok("a dog")
    assert tok.max_length == 128 and ids.shape == (1, 128)
    ids, _ = tok([])
    assert ids.shape == (0, 128)


def test_bad_vocab_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        T5Tokenizer(str(tmp_path / "missing.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="junk.model"):
        T5Tokenizer(str(junk))
    # SentencePiece's default layout (unk 0, bos 1, eos 2) is not T5's.
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(CAPTIONS), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=60, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="pad/eos ids"):
        T5Tokenizer(str(tmp_path / "plain.model"))
    with pytest.raises(ValueError):
        train_sentencepiece(["", "  "], str(tmp_path / "empty"))
