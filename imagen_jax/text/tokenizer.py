"""SentencePiece tokenizer with T5's conventions: pad id 0, EOS id 1 appended, fixed length."""
from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from imagen_jax import paths

log = logging.getLogger(__name__)

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


class T5Tokenizer:
    """Prompts -> fixed-length token ids and mask, as T5's encoder expects them.

    Each prompt becomes its SentencePiece ids followed by EOS (1), then pad (0) up to
    `max_length`. A prompt with more than max_length - 1 pieces is cut to that many and
    still ends in EOS; such prompts are counted (`last_num_truncated` for the latest call,
    `num_truncated` over the tokenizer's life) and reported with one log line per call.
    """

    def __init__(self, vocab_path: str | os.PathLike, max_length: int = 128):
        vocab_path = os.fspath(vocab_path)
        if not paths.isfile(vocab_path):
            raise FileNotFoundError(f"{vocab_path}: SentencePiece model not found; expected T5's "
                                    "vocabulary file (e.g. spiece.model / sentencepiece.model)")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (one piece + EOS), got {max_length}")
        self._sp = spm.SentencePieceProcessor()
        try:
            # From bytes, so gs://t5-data/vocabs/... loads like a local file.
            self._sp.LoadFromSerializedProto(paths.read_bytes(vocab_path))
        except Exception as e:
            raise ValueError(f"{vocab_path}: not a SentencePiece model ({e})") from None
        if self._sp.pad_id() != PAD_ID or self._sp.eos_id() != EOS_ID:
            raise ValueError(f"{vocab_path}: pad/eos ids are {self._sp.pad_id()}/{self._sp.eos_id()}; "
                             f"T5 needs pad {PAD_ID} and eos {EOS_ID}")
        self.vocab_path = vocab_path
        self.max_length = int(max_length)
        self.last_num_truncated = 0
        self.num_truncated = 0

    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces (T5's 32000; the model's table may be larger)."""
        return self._sp.GetPieceSize()

    def tokenize(self, prompts: Sequence[str] | str) -> tuple[np.ndarray, np.ndarray]:
        """prompts (list of B strings) -> (ids int32 [B, max_length], mask bool [B, max_length])."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        pieces = self._sp.EncodeAsIds(prompts) if prompts else []
        ids = np.zeros((len(prompts), self.max_length), np.int32)
        keep = self.max_length - 1  # room for EOS
        truncated = 0
        for row, p in enumerate(pieces):
            if len(p) > keep:
                truncated += 1
                p = p[:keep]
            ids[row, :len(p)] = p
            ids[row, len(p)] = EOS_ID
        self.last_num_truncated = truncated
        self.num_truncated += truncated
        if truncated:
            log.warning("%d of %d prompts were longer than %d tokens and were truncated",
                        truncated, len(prompts), self.max_length)
        return ids, ids != PAD_ID

    __call__ = tokenize

    def decode(self, ids: np.ndarray) -> list[str]:
        """ids [B, L] -> B strings, stopping at the first EOS."""
        out = []
        for row in np.asarray(ids):
            row = [int(t) for t in row]
            if EOS_ID in row:
                row = row[:row.index(EOS_ID)]
            out.append(self._sp.DecodeIds([t for t in row if t != PAD_ID]))
        return out


def train_sentencepiece(captions: Iterable[str], out_prefix: str | os.PathLike,
                        vocab_size: int = 256, model_type: str = "bpe") -> str:
    """Train a small SentencePiece model laid out like T5's vocabulary.

    pad=0, eos=1, unk=2 and no BOS, pieces '<pad>', '</s>', '<unk>'. `vocab_size` is a soft
    limit: a small caption set yields fewer pieces rather than an error. BPE by default:
    on a few hundred captions it learns whole words, where unigram (T5's own choice, for
    large corpora) stays near single characters. Returns the path of the written
    '<out_prefix>.model' (a '.vocab' file is written beside it).
    """
    captions = [c for c in captions if c and c.strip()]
    if not captions:
        raise ValueError("train_sentencepiece needs at least one non-empty caption")
    out_prefix = os.fspath(out_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    try:  # sentencepiece writes its log to stderr's file descriptor; a replaced stderr has none
        sys.stderr.fileno()
        log_ok = True
    except (AttributeError, OSError, ValueError):
        log_ok = False
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.Train(
            logstream=quiet if log_ok else None,
            sentence_iterator=iter(captions),
            model_prefix=out_prefix,
            model_type=model_type,
            vocab_size=int(vocab_size),
            hard_vocab_limit=False,
            character_coverage=1.0,
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            num_threads=1,  # deterministic result for the same captions
        )
    return out_prefix + ".model"
