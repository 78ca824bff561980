"""Two real processes (jax.distributed over localhost, one CPU device each) as two hosts of a pod (issue
14): both run encode_text on one store at once, each writing its own parts, and both read their shares of a
late global batch of a TFRecord set; checked against one process doing all of it."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from test_multihost import env, free_port, last_json

HERE = os.path.dirname(os.path.abspath(__file__))
CAPTIONS = [f"a {c} {s} at the {p}" for c in ("red", "blue", "green") for s in ("circle", "square", "star")
            for p in ("top", "bottom")]  # 18 captions: chunks of 4 -> 5 parts, 3 for host 0 and 2 for host 1
LATE = 10**6 - 1


def test_two_hosts_encode_their_shares_and_read_disjoint_batches(tmp_path):
    pytest.importorskip("tensorflow")
    from imagen_jax.data import pipeline
    from imagen_jax.text import checkpoints as t5_checkpoints
    from imagen_jax.text.encoder import TextEncoder
    from imagen_jax.text.store import EmbeddingStore
    from stage_utils import shapes_vocab, tiny_config

    vocab = shapes_vocab(tmp_path)
    enc = TextEncoder.random(vocab, max_length=16)
    t5 = t5_checkpoints.save_safetensors(jax.device_get(enc.params), str(tmp_path / "t5.safetensors"))[0]
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    rng = np.random.default_rng(1)
    examples = [{"image": rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8), "caption": [f"caption {i}"]}
                for i in range(12)]
    pipeline.write_tfrecords(str(tmp_path / "train.tfrecord"), examples, num_shards=3)
    files = str(tmp_path / "train.tfrecord-*")
    store = str(tmp_path / "store")

    port = free_port()
    argv = [sys.executable, os.path.join(HERE, "text_data_multihost_worker.py"), t5, vocab,
            str(tmp_path / "captions.txt"), store, files, str(LATE)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(1, IMAGEN_JAX_COORDINATOR=f"127.0.0.1:{port}", IMAGEN_JAX_NUM_PROCESSES="2",
                                      IMAGEN_JAX_PROCESS_ID=str(i))) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    hosts = sorted((last_json(out) for out, _ in outs), key=lambda r: r["process"])
    assert [(h["process"], h["processes"], h["encode_text"]) for h in hosts] == [(0, 2, 0), (1, 2, 0)]
    # Each host said how much it encoded: chunks 0, 2, 4 (10 captions) and 1, 3 (8).
    said = [next(ln for ln in out.splitlines() if ln.startswith("encode_text:")) for out, _ in outs]
    assert "(10 encoded by this host in 3 parts" in said[0] and "(8 encoded by this host in 2 parts" in said[1], said

    # The store both wrote is the one store a single host would have written.
    s = EmbeddingStore(store)
    assert len(s) == len(CAPTIONS) and len(s.parts) == 5
    emb, mask = s.lookup(CAPTIONS)
    one = TextEncoder.from_checkpoint(t5, vocab, max_length=16)
    # In the hosts' batches of 4: another batch shape may round a float32 value to the neighbouring bfloat16.
    ref, ref_mask = (np.concatenate(x) for x in zip(*(
        [np.asarray(a) for a in one.encode(CAPTIONS[i:i + 4])] for i in range(0, len(CAPTIONS), 4))))
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(emb, ref.astype(emb.dtype))

    # The two hosts' batches are disjoint halves of the global batch one host reads at that step.
    c = tiny_config("base64", **{"data.source": "tfrecord", "data.files": files, "data.prefetch": 0,
                                 "data.image_size": 8})
    whole = next(pipeline.make_iterator(c, global_batch=4, start_step=LATE))
    ids = [int(x.split()[-1]) for x in whole["captions"]]
    assert not set(hosts[0]["ids"]) & set(hosts[1]["ids"])
    assert hosts[0]["ids"] + hosts[1]["ids"] == ids
    assert [h["image_sum"] for h in hosts] == pytest.approx(
        [float(whole["image"][:2].astype(np.float64).sum()), float(whole["image"][2:].astype(np.float64).sum())])

