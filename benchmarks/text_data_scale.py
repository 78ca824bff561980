"""Issue 14's figures: embedding-store bytes per caption and index memory, T5 encode throughput on CPU, and the
time to resume the tfrecord input at a late step.

    python benchmarks/text_data_scale.py --out /tmp/scale [--index_captions 1000000]

Synthetic data (no real T5-XXL weights or captions here): rows of T5-XXL width (4096 x 128 tokens) with a
token count per caption drawn from 10..24 (COCO captions are ~11 words, ~16 T5 pieces with EOS) and bfloat16
values ~ N(0, 1) times a per-channel scale drawn from 0.1..2 (what a final RMS norm with learned scales gives).
Real T5 outputs are not Gaussian, so the compression of the kept tokens is an estimate; the padding, which is
most of a 128-token row, is dropped exactly.
"""
import argparse
import json
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imagen_jax.text import store as store_lib  # noqa: E402


def synthetic_rows(n, length, dim, rng):
    tokens = rng.integers(10, 25, size=n)
    scale = rng.uniform(0.1, 2.0, size=dim).astype(np.float32)
    emb = np.zeros((n, length, dim), np.float32)
    mask = np.arange(length)[None] < tokens[:, None]
    for i, t in enumerate(tokens):
        emb[i, :t] = rng.standard_normal((t, dim), np.float32) * scale
    return emb, mask


def bytes_per_caption(out, n, length, dim, seed=0):
    rng = np.random.default_rng(seed)
    d = os.path.join(out, f"store_{dim}x{length}")
    store_lib.create(d, {"max_length": length, "d_model": dim, "model_sha256": "synthetic", "vocab_sha256": None})
    emb, mask = synthetic_rows(n, length, dim, rng)
    t0 = time.perf_counter()
    written = store_lib.write_part(d, "bench-000000", [f"caption {i}" for i in range(n)], emb, mask)
    write_s = time.perf_counter() - t0
    store = store_lib.EmbeddingStore(d)
    t0 = time.perf_counter()
    got, _ = store.lookup([f"caption {i}" for i in range(n)])
    read_s = time.perf_counter() - t0
    assert (got.astype(np.float32)[mask] != 0).any()
    return {"dim": dim, "length": length, "captions": n, "bytes_per_caption": written / n,
            "uncompressed_v1_bytes": length * dim * 2 + length, "mean_tokens": float(mask.sum(1).mean()),
            "bytes_per_kept_value": written / mask.sum() / dim,
            "write_rows_per_s": n / write_s, "lookup_rows_per_s": n / read_s}


def index_memory(out, n, chunk=100_000):
    d = os.path.join(out, "store_index")
    store_lib.create(d, {"max_length": 4, "d_model": 2, "model_sha256": "synthetic", "vocab_sha256": None})
    rng = np.random.default_rng(1)
    for k in range(0, n, chunk):
        m = min(chunk, n - k)
        emb = rng.standard_normal((m, 4, 2)).astype(np.float32)
        store_lib.write_part(d, f"bench-{k // chunk:06d}", [f"a synthetic caption number {i}" for i in range(k, k + m)],
                             emb, np.ones((m, 4), bool))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    store = store_lib.EmbeddingStore(d)
    open_s = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    probe = [f"a synthetic caption number {i}" for i in rng.integers(0, n, 2048)]
    t0 = time.perf_counter()
    store.lookup(probe)
    lookup_s = time.perf_counter() - t0
    return {"captions": len(store), "index_bytes": store.index_bytes, "index_bytes_per_caption": store.index_bytes / len(store),
            "open_s": open_s, "peak_rss_growth_mib_upper_bound": (rss1 - rss0) / 1024,
            "lookup_2048_random_s": lookup_s}


def encode_throughput(out, n=512, length=128):
    import jax

    from imagen_jax import encode_text
    from imagen_jax.data import shapes
    from imagen_jax.text.encoder import TextEncoder
    from imagen_jax.text.tokenizer import train_sentencepiece

    ds = shapes.ShapesDataset(seed=0, size=8)
    captions = list(dict.fromkeys(ds.captions(4 * n)))[:n]
    vocab = train_sentencepiece(captions, os.path.join(out, "spm"), vocab_size=256)
    enc = TextEncoder.random(vocab, max_length=length)  # tiny: d_model 64, 2 layers
    encode_text.encode_captions(enc, captions[:64], os.path.join(out, "warm"), batch_size=64, progress=False)
    t0 = time.perf_counter()
    encode_text.encode_captions(enc, captions, os.path.join(out, "enc"), batch_size=64, shard_size=256, progress=False)
    s = time.perf_counter() - t0
    return {"captions": len(captions), "seconds": s, "captions_per_s": len(captions) / s, "max_length": length,
            "d_model": enc.dim, "layers": enc.config.num_layers, "devices": jax.local_device_count(),
            "cpus": os.cpu_count()}


def resume_time(out, step=2_500_000, global_batch=2048):
    from imagen_jax.data import pipeline
    import importlib

    rng = np.random.default_rng(2)
    examples = [{"image": rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8), "caption": f"caption {i}"}
                for i in range(4096)]
    pipeline.write_tfrecords(os.path.join(out, "train.tfrecord"), examples, num_shards=8)
    c = importlib.import_module("configs.base64").get_config("tiny")
    c.data.update(source="tfrecord", files=os.path.join(out, "train.tfrecord-*"), prefetch=0, image_size=16)
    t0 = time.perf_counter()
    pipeline.tfrecord_positions(4096, step, global_batch, global_batch, 0, 0)
    positions_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    it = pipeline.make_iterator(c, global_batch=global_batch, start_step=step)
    next(it)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    next(pipeline.make_iterator(c, global_batch=global_batch, start_step=0))
    step0_s = time.perf_counter() - t0
    return {"step": step, "global_batch": global_batch, "records": 4096, "positions_s": positions_s,
            "first_batch_at_step_s": first_s, "first_batch_at_step0_s": step0_s}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--index_captions", type=int, default=1_000_000)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--only", default="store,index,encode,resume")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    res = {}
    only = a.only.split(",")
    if "store" in only:
        res["store_xxl"] = bytes_per_caption(a.out, a.rows, 128, 4096)
        res["store_1024"] = bytes_per_caption(a.out, 4 * a.rows, 128, 1024)
    if "index" in only:
        res["index"] = index_memory(a.out, a.index_captions)
    if "encode" in only:
        res["encode"] = encode_throughput(a.out)
    if "resume" in only:
        res["resume"] = resume_time(a.out)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
