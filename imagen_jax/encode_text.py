"""Precompute T5 text embeddings for a caption set, so training can skip the encoder.

    python -m imagen_jax.encode_text --t5 gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000 \
        --vocab spiece.model --captions_file captions.txt --out embeddings/
    python -m imagen_jax.encode_text --t5 t5-v1_1-xxl/ --vocab spiece.model \
        --tfds coco_captions --split train --caption_key captions/text --out embeddings/

Captions are deduplicated (first occurrence kept), cut into shards of --shard_size in input
order, and each shard is written atomically (temp file + rename), so an interrupted run
resumes where it stopped when started again with the same arguments. The result is read
with `imagen_jax.text.encoder.EmbeddingStore(out).lookup(captions)`; the layout is
described there. Embeddings are stored as bfloat16 with padded positions zeroed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from typing import Iterable, Sequence

import ml_dtypes
import numpy as np

from imagen_jax import cli
from imagen_jax.text.encoder import (STORE_FORMAT, STORE_VERSION, EmbeddingStore, TextEncoder,
                                     captions_digest)

log = logging.getLogger("imagen_jax.encode_text")

__all__ = ["main", "encode_captions", "read_captions_file", "EmbeddingStore"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m imagen_jax.encode_text", description=__doc__.split("\n")[0])
    p.add_argument("--t5", required=True, help="T5X checkpoint dir / msgpack file, or HF safetensors")
    p.add_argument("--vocab", required=True, help="T5's SentencePiece model file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--captions_file", help="UTF-8 text file, one caption per line")
    src.add_argument("--tfds", help="TFDS dataset name (needs tensorflow-datasets)")
    p.add_argument("--split", default="train", help="TFDS split")
    p.add_argument("--caption_key", default="caption",
                   help="TFDS feature holding the caption(s); '/' descends ('captions/text')")
    p.add_argument("--data_dir", default=None, help="TFDS data_dir")
    p.add_argument("--out", required=True, help="output directory (created; resumed if present)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_length", type=int, default=128, help="tokens per caption incl. EOS")
    p.add_argument("--shard_size", type=int, default=4096, help="captions per shard file")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="parameter and compute dtype; auto: bfloat16 on accelerators, float32 on CPU")
    args = p.parse_args(argv)
    for name in ("batch_size", "max_length", "shard_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    return args


# --------------------------------------------------------------------------- caption sources


def read_captions_file(path: str) -> list[str]:
    """One caption per line; surrounding whitespace stripped; empty lines skipped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _tfds_captions(name: str, split: str, key: str, data_dir: str | None) -> Iterable[str]:
    # TensorFlow is imported here only: the rest of this tool (and imagen_jax.text) runs without it.
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare()
    # Skip image decoding: only the text is needed.
    decoders = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
                if isinstance(f, tfds.features.Image)}
    ds = builder.as_dataset(split=split, decoders=decoders or None)
    for example in tfds.as_numpy(ds):
        value = example
        for part in key.split("/"):
            if not isinstance(value, dict) or part not in value:
                raise ValueError(f"TFDS {name}:{split} has no feature {key!r}; "
                                 f"features are {sorted(example)}")
            value = value[part]
        for item in np.asarray(value).reshape(-1):  # a caption or a list of them
            text = item.decode("utf-8") if isinstance(item, bytes) else str(item)
            if text.strip():
                yield text.strip()


def _dedupe(captions: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(captions))


# --------------------------------------------------------------------------- encoding


def _model_fingerprint(encoder: TextEncoder) -> str:
    """Identifies the weights cheaply (config + final norm scale), so a resumed run cannot
    mix embeddings of two different T5 checkpoints."""
    c = encoder.config
    shape = (c.vocab_size, c.d_model, c.num_heads, c.head_dim, c.d_ff, c.num_layers)
    h = hashlib.sha256(repr(shape).encode())  # not the dtype: resuming on other hardware is fine
    scale = encoder.params["encoder"]["encoder_norm"]["scale"]
    # Rounded to bfloat16 first: parameters loaded as float32 and as bfloat16 then hash alike.
    h.update(np.asarray(scale).astype(ml_dtypes.bfloat16).astype(np.float32).tobytes())
    return h.hexdigest()


def _vocab_digest(vocab_path) -> str | None:
    """SHA-256 of the SentencePiece model: another vocabulary gives other token ids, so a resume
    with it would mix two encodings."""
    if not vocab_path:
        return None
    from etils import epath

    return hashlib.sha256(epath.Path(vocab_path).read_bytes()).hexdigest()


def check_out(out: str) -> None:
    """--out must be creatable; an existing non-empty one must be an embedding store (resuming writes
    into it, so it is never another tool's directory)."""
    from etils import epath

    cli.check_output(out, "--out")
    d = epath.Path(out)
    if "://" not in out and d.is_dir() and any(d.iterdir()) and not (d / EmbeddingStore.META).exists():
        raise cli.UsageError(f"--out {out} exists and is not an embedding store (no {EmbeddingStore.META}); "
                             "give a new or empty directory")


def encode_captions(encoder: TextEncoder, captions: Sequence[str], out: str, *,
                    batch_size: int = 64, shard_size: int = 4096, t5_path: str = "",
                    progress: bool = True) -> dict:
    """Encode unique `captions` into an EmbeddingStore at `out`, skipping finished shards.

    Returns the index dict written to out/index.json (without the caption map).
    """
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    meta = {
        "format": STORE_FORMAT, "version": STORE_VERSION,
        "count": len(captions), "shard_size": shard_size, "num_shards": -(-len(captions) // shard_size),
        "max_length": encoder.max_length, "d_model": encoder.dim, "dtype": "bfloat16",
        "dims": {"embeddings": ["row", encoder.max_length, encoder.dim], "mask": ["row", encoder.max_length]},
        "captions_sha256": captions_digest(captions),
        "model_sha256": _model_fingerprint(encoder),
        "t5": t5_path, "vocab": encoder.tokenizer.vocab_path,
        "vocab_sha256": _vocab_digest(encoder.tokenizer.vocab_path),
    }
    meta_path = os.path.join(out, EmbeddingStore.META)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        differs = [k for k in ("captions_sha256", "model_sha256", "shard_size", "max_length",
                               "d_model", "format", "vocab_sha256")
                   if old.get(k) != meta[k] and not (k == "vocab_sha256" and k not in old)]
        if differs:
            raise ValueError(f"{out} holds embeddings of another run ({', '.join(differs)} differ); "
                             "use a new --out directory or delete this one")
    else:
        EmbeddingStore.write_json(meta_path, meta)

    shards = range(meta["num_shards"])
    todo = [s for s in shards if not EmbeddingStore.shard_done(out, s)]
    if len(todo) < len(shards):
        log.info("resuming: %d of %d shards already done", len(shards) - len(todo), len(shards))
    remaining = sum(len(captions[s * shard_size:(s + 1) * shard_size]) for s in todo)
    with tqdm(total=remaining, unit="caption", disable=not progress, desc="encode_text") as bar:
        for s in todo:
            chunk = captions[s * shard_size:(s + 1) * shard_size]
            embs, masks = [], []
            for start in range(0, len(chunk), batch_size):
                emb, mask = encoder.encode(chunk[start:start + batch_size])
                # Cast on device: half the bytes to move to the host.
                embs.append(np.asarray(emb.astype("bfloat16")))
                masks.append(np.asarray(mask))
                bar.update(len(emb))
            EmbeddingStore.write_shard(out, s, np.concatenate(embs), np.concatenate(masks))

    index = {**meta, "shards": [os.path.basename(EmbeddingStore.shard_files(out, s)[0])
                                for s in shards]}
    where = {c: [i // shard_size, i % shard_size] for i, c in enumerate(captions)}
    EmbeddingStore.write_json(os.path.join(out, EmbeddingStore.INDEX), {**index, "captions": where})
    return index


def _make_mesh():
    import jax
    from jax.sharding import Mesh

    if jax.device_count() == 1:
        return None
    return Mesh(np.array(jax.devices()), ("data",))


def run(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    check_out(args.out)
    if args.captions_file:
        captions = _dedupe(read_captions_file(args.captions_file))
        source = args.captions_file
    else:
        captions = _dedupe(_tfds_captions(args.tfds, args.split, args.caption_key, args.data_dir))
        source = f"tfds:{args.tfds}/{args.split}"
    if not captions:
        raise ValueError(f"{source}: no captions found")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
             "auto": jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16}[args.dtype]
    encoder = TextEncoder.from_checkpoint(args.t5, args.vocab, max_length=args.max_length,
                                          dtype=dtype, mesh=_make_mesh())
    log.info("encoding %d unique captions from %s with T5 %s (d_model %d, %d layers)",
             len(captions), source, args.t5, encoder.config.d_model, encoder.config.num_layers)
    index = encode_captions(encoder, captions, args.out, batch_size=args.batch_size,
                            shard_size=args.shard_size, t5_path=args.t5)
    index["num_truncated"] = encoder.tokenizer.num_truncated
    return index


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        index = run(args)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError; missing files OSError
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"encode_text: error: {message}", file=sys.stderr)
        return 2
    print(f"encode_text: {index['count']} captions in {index['num_shards']} shards at {args.out} "
          f"({index['num_truncated']} truncated to {index['max_length']} tokens this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
