"""TextEncoder, the encode_text CLI (incl. resume after interruption) and EmbeddingStore."""
import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh

from imagen_jax import encode_text
from imagen_jax.text import checkpoints, t5
from imagen_jax.text.encoder import EmbeddingStore, TextEncoder
from imagen_jax.text.tokenizer import T5Tokenizer, train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = [f"a {c} {t} {p}" for c in ["red", "blue", "green"]
            for t in ["cat", "dog", "boat"] for p in ["at night", "in the sun"]]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return train_sentencepiece(CAPTIONS, str(tmp_path_factory.mktemp("sp") / "captions"), vocab_size=80)


@pytest.fixture(scope="module")
def t5_path(fixtures_dir):
    return os.path.join(fixtures_dir, "t5x", "test_t5_tiny.checkpoint_0")


@pytest.fixture(scope="module")
def encoder(t5_path, vocab):
    return TextEncoder.from_checkpoint(t5_path, vocab, max_length=16)


# --------------------------------------------------------------------------- TextEncoder


def test_text_encoder_matches_t5_encode_and_zeroes_padding(encoder, t5_path, vocab):
    prompts = ["a red cat at night", "a boat", "a green dog in the sun"]
    emb, mask = encoder.encode(prompts)
    assert emb.shape == (3, 16, 8) and mask.shape == (3, 16) and mask.dtype == bool
    config, params = t5.load_checkpoint(t5_path)
    ids, ref_mask = T5Tokenizer(vocab, max_length=16).tokenize(prompts)
    ref = np.asarray(t5.encode(config, params, ids, ref_mask))
    np.testing.assert_array_equal(np.asarray(mask), ref_mask)
    np.testing.assert_allclose(np.asarray(emb)[ref_mask], ref[ref_mask], rtol=1e-6, atol=1e-6)
    assert (np.asarray(emb)[~ref_mask] == 0).all()


def test_text_encoder_shards_batch_over_mesh(encoder):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = TextEncoder(encoder.config, encoder.params, encoder.tokenizer, mesh=mesh)
    assert sharded.batch_multiple == 8
    assert all(leaf.sharding.mesh == mesh for leaf in jax.tree_util.tree_leaves(sharded.params))
    prompts = CAPTIONS[:11]  # padded to 16 rows inside, 11 come back
    emb, mask = sharded.encode(prompts)
    ref_emb, ref_mask = encoder.encode(prompts)
    assert emb.shape == (11, 16, 8)
    np.testing.assert_allclose(np.asarray(emb), np.asarray(ref_emb), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(ref_mask))
    emb16, _ = sharded.encode(CAPTIONS[:16])  # a multiple of 8: stays split over the devices
    assert len({tuple((i.start, i.stop) for i in s.index) for s in emb16.addressable_shards}) == 8
    assert {s.data.shape for s in emb16.addressable_shards} == {(2, 16, 8)}


def test_text_encoder_with_sharded_params(encoder, t5_path, vocab):
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
    sharded = TextEncoder.from_checkpoint(t5_path, vocab, max_length=16, mesh=mesh,
                                          rules=t5.DEFAULT_RULES)
    assert sharded.batch_multiple == 2  # batch over 'fsdp' (no 'data' axis in this mesh)
    emb_table = sharded.params["token_embedder"]["embedding"]
    assert emb_table.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    prompts = CAPTIONS[:5]
    emb, mask = sharded.encode(prompts)
    ref_emb, ref_mask = encoder.encode(prompts)
    np.testing.assert_allclose(np.asarray(emb), np.asarray(ref_emb), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(ref_mask))


def test_random_tiny_encoder(vocab):
    a = TextEncoder.random(vocab, max_length=12, seed=3)
    b = TextEncoder.random(vocab, max_length=12, seed=3)
    c = TextEncoder.random(vocab, max_length=12, seed=4)
    tiny = t5.SIZES["tiny"]
    assert (a.config.d_model, a.config.num_layers, a.config.d_ff) == (
        tiny["d_model"], tiny["num_layers"], tiny["d_ff"])
    assert a.config.vocab_size % 128 == 0 and a.config.vocab_size >= a.tokenizer.vocab_size
    prompts = ["a red cat", "a dog"]
    ea, ma = a.encode(prompts)
    assert ea.shape == (2, 12, tiny["d_model"]) and np.isfinite(np.asarray(ea)).all()
    np.testing.assert_array_equal(np.asarray(ea), np.asarray(b.encode(prompts)[0]))
    assert not np.allclose(np.asarray(ea), np.asarray(c.encode(prompts)[0]))
    # Unit RMS after the final norm at real tokens (scale initialised to ones).
    rms = np.sqrt((np.asarray(ea)[np.asarray(ma)] ** 2).mean(-1))
    np.testing.assert_allclose(rms, 1.0, rtol=1e-3)


def test_tokenizer_larger_than_embedding_table_rejected(encoder, vocab):
    small = t5.T5Config(vocab_size=8, d_model=8, num_heads=4, head_dim=3, d_ff=16, num_layers=2)
    with pytest.raises(ValueError, match="pieces but the T5 embedding table only 8 rows"):
        TextEncoder(small, encoder.params, encoder.tokenizer)


# --------------------------------------------------------------------------- CLI + store


@pytest.fixture()
def captions_file(tmp_path):
    lines = CAPTIONS[:10] + ["", CAPTIONS[0], "  " + CAPTIONS[3] + "  "]  # blank + duplicates
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def cli(t5_path, vocab, captions_file, out, **flags):
    argv = ["--t5", t5_path, "--vocab", vocab, "--captions_file", captions_file, "--out", str(out),
            "--batch_size", "3", "--shard_size", "4", "--max_length", "16"]
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    return encode_text.main(argv)


def _parts(out):
    return sorted(p.name for p in (out / "parts").glob("*.index.npy"))


def test_cli_writes_store_and_resumes_after_interruption(t5_path, vocab, captions_file, encoder,
                                                         tmp_path, monkeypatch):
    out = tmp_path / "emb"
    original = TextEncoder.encode
    calls = []

    def interrupted(self, prompts):
        calls.append(len(prompts))
        if len(calls) == 3:  # first batch of the second part
            raise KeyboardInterrupt
        return original(self, prompts)

    monkeypatch.setattr(TextEncoder, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli(t5_path, vocab, captions_file, out)
    assert len(_parts(out)) == 1 and _parts(out)[0].endswith("-000000.index.npy")
    assert len(EmbeddingStore(str(out))) == 4  # a finished part is readable at once
    done = sorted((out / "parts").iterdir())
    stamps = [os.stat(f).st_mtime_ns for f in done]

    calls.clear()

    def counting(self, prompts):
        calls.append(len(prompts))
        return original(self, prompts)

    monkeypatch.setattr(TextEncoder, "encode", counting)
    assert cli(t5_path, vocab, captions_file, out) == 0
    assert sum(calls) == 6  # parts 1 and 2 only (4 + 2 captions); part 0 was not redone
    assert [os.stat(f).st_mtime_ns for f in done] == stamps
    assert not list(out.rglob("*.tmp*"))

    store = EmbeddingStore(str(out))
    assert len(store) == 10 and (store.max_length, store.dim, len(store.parts)) == (16, 8, 3)
    meta = json.loads((out / "store.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["compression"].startswith("zstd") and meta["version"] == 2

    query = [CAPTIONS[9], CAPTIONS[0], CAPTIONS[5]]
    emb, mask = store.lookup(query)
    assert emb.dtype == ml_dtypes.bfloat16 and emb.shape == (3, 16, 8)
    ref_emb, ref_mask = encoder.encode(query)
    np.testing.assert_array_equal(mask, np.asarray(ref_mask))
    np.testing.assert_array_equal(emb, np.asarray(ref_emb).astype(ml_dtypes.bfloat16))
    as_f32, _ = store.lookup(query, dtype=np.float32)
    assert as_f32.dtype == np.float32
    # Surrounding and doubled whitespace find the stored caption (the file had "  " + CAPTIONS[3] + "  ").
    spaced, _ = store.lookup(["  " + CAPTIONS[3].replace(" ", "  ") + "\t"])
    np.testing.assert_array_equal(spaced[0], store.lookup([CAPTIONS[3]])[0][0])
    with pytest.raises(KeyError, match="not in the embedding store"):
        store.lookup(["a purple elephant"])

    # A finished run started again does no work.
    calls.clear()
    assert cli(t5_path, vocab, captions_file, out) == 0
    assert calls == []


def test_cli_appends_and_refuses_another_t5(t5_path, vocab, captions_file, encoder, tmp_path, capsys):
    out = tmp_path / "emb"
    assert cli(t5_path, vocab, captions_file, out) == 0
    more = tmp_path / "more.txt"
    more.write_text(CAPTIONS[8] + "\n" + "\n".join(CAPTIONS[10:]) + "\n")  # one held, 8 new
    capsys.readouterr()
    assert cli(t5_path, vocab, str(more), out) == 0
    assert "(8 encoded by this host" in capsys.readouterr().out
    store = EmbeddingStore(str(out))
    assert len(store) == len(CAPTIONS) and store.contains(CAPTIONS).all()
    emb, _ = store.lookup(CAPTIONS[10:])
    np.testing.assert_array_equal(emb, np.asarray(encoder.encode(CAPTIONS[10:])[0]).astype(ml_dtypes.bfloat16))
    # Same store, other weights (final norm changed): refused, nothing written.
    _, params = t5.load_checkpoint(t5_path)
    params["encoder"]["encoder_norm"]["scale"] = params["encoder"]["encoder_norm"]["scale"] * 2
    other_t5 = checkpoints.save_safetensors(params, str(tmp_path / "other.safetensors"))[0]
    before = _parts(out)
    assert cli(other_t5, vocab, captions_file, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model_sha256" in err[0] and _parts(out) == before


def test_hosts_write_their_shares_in_parallel(encoder, tmp_path):
    """Two hosts (process 0 and 1 of 2) on one store at the same time: disjoint parts, one readable store."""
    import threading

    out = str(tmp_path / "emb")
    results = {}

    def host(p):
        results[p] = encode_text.encode_captions(encoder, CAPTIONS, out, batch_size=4, shard_size=4,
                                                 progress=False, process_index=p, process_count=2)

    threads = [threading.Thread(target=host, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0]["encoded"] + results[1]["encoded"] == len(CAPTIONS)  # 18: chunks 0,2,4 and 1,3
    assert (results[0]["encoded"], results[1]["encoded"]) == (10, 8)
    store = EmbeddingStore(out)
    assert len(store) == len(CAPTIONS) and len(store.parts) == 5
    emb, mask = store.lookup(CAPTIONS)
    ref, ref_mask = encoder.encode(CAPTIONS)
    np.testing.assert_array_equal(emb, np.asarray(ref).astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(mask, np.asarray(ref_mask))


def test_old_store_gets_a_clear_message(tmp_path):
    (tmp_path / "index.json").write_text("{}")
    with pytest.raises(ValueError, match="format version 1.*encode the captions again"):
        EmbeddingStore(str(tmp_path))


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "wrong_model"])
def test_cli_bad_checkpoint_prints_one_line(case, vocab, captions_file, fixtures_dir, tmp_path, capsys):
    path = {"missing": str(tmp_path / "no_such_ckpt"),
            "not_a_checkpoint": str(tmp_path),
            "wrong_model": os.path.join(fixtures_dir, "t5x", "tiny_t5_zarr", "checkpoint_1")}[case]
    assert cli(path, vocab, captions_file, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("encode_text: error:") and path in err[0]
    assert "Traceback" not in err[0]
    assert not (tmp_path / "out" / "index.json").exists()


def test_cli_as_module_without_tensorflow(vocab, captions_file, tmp_path):
    code = ("import sys, imagen_jax.encode_text as m; "
            "assert 'tensorflow' not in sys.modules and 'tensorflow_datasets' not in sys.modules; "
            "sys.exit(m.main(sys.argv[1:]))")
    proc = subprocess.run(
        [sys.executable, "-c", code, "--t5", str(tmp_path / "missing"), "--vocab", vocab,
         "--captions_file", captions_file, "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("encode_text: error:")]
    assert len(errors) == 1 and "missing" in errors[0] and "Traceback" not in proc.stderr
