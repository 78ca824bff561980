"""The demo vocabulary on a multi-host run (every host builds its text encoder at once): only
process 0 writes it into the workdir, atomically; the others read the same vocabulary from a
private copy until the workdir holds it, and write nothing."""
import os

import jax

from imagen_jax import conditioning
from imagen_jax.text import tokenizer as tokenizer_lib


def test_only_process_0_writes_the_vocabulary(tmp_path, monkeypatch):
    workdir = tmp_path / "wd"
    prefix = str(workdir / "vocab" / "shapes_spm")
    trained_at = []
    real = tokenizer_lib.train_sentencepiece
    monkeypatch.setattr(tokenizer_lib, "train_sentencepiece",
                        lambda captions, out, **kw: trained_at.append(str(out)) or real(captions, out, **kw))

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    other = conditioning.demo_vocab(prefix)
    assert not workdir.exists() and not other.startswith(str(tmp_path))

    monkeypatch.setattr(jax, "process_index", lambda: 0)
    written = conditioning.demo_vocab(prefix)
    assert written == prefix + ".model"
    # Trained outside the workdir and moved in whole: no partial model or temp file is ever there.
    assert not any(p.startswith(str(workdir)) for p in trained_at)
    assert os.listdir(workdir / "vocab") == ["shapes_spm.model"]
    # Every host tokenizes alike (the files differ only in the trainer's recorded output path).
    import sentencepiece as spm
    a, b = spm.SentencePieceProcessor(model_file=other), spm.SentencePieceProcessor(model_file=written)
    assert [a.id_to_piece(i) for i in range(a.get_piece_size())] == [b.id_to_piece(i) for i in range(b.get_piece_size())]
    assert [a.get_score(i) for i in range(a.get_piece_size())] == [b.get_score(i) for i in range(b.get_piece_size())]

    # Once it is there, every process reads the workdir's copy and trains nothing.
    trained_at.clear()
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert conditioning.demo_vocab(prefix) == written and trained_at == []
