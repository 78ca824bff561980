"""Precompute T5 text embeddings for a caption set, so training can skip the encoder.

    python -m imagen_jax.encode_text --t5 gs://t5-data/pretrained_models/t5x/t5_1_1_xxl/checkpoint_1000000 \
        --vocab spiece.model --captions_file captions.txt --out embeddings/
    python -m imagen_jax.encode_text --t5 t5-v1_1-xxl/ --vocab spiece.model \
        --tfds coco_captions --split train --caption_key captions/text --out embeddings/

Captions are normalised (whitespace collapsed, ends stripped) and deduplicated (first occurrence kept), cut
into chunks of --shard_size in input order; host p of P (--process_index/--process_count, default jax's)
encodes chunks p, p + P, ... and writes each as one part of the store, so every host of a pod writes its
share in parallel. A part is written atomically, so an interrupted run resumes where it stopped when started
again with the same arguments. An existing store is appended to: captions it already holds are skipped, and a
store of another T5 or vocabulary is refused. The result is read with
`imagen_jax.text.store.EmbeddingStore(out).lookup(captions)`; the layout (bfloat16, zstd-compressed rows,
padded positions dropped) is described there. --out may be local or gs://.
"""
from __future__ import annotations

import hashlib
import logging
import sys
import types
from typing import Iterable, Sequence

import numpy as np
from absl import flags

from imagen_jax import cli, paths
from imagen_jax.text import store as store_lib
from imagen_jax.text.encoder import TextEncoder
from imagen_jax.text.store import EmbeddingStore

log = logging.getLogger("imagen_jax.encode_text")

__all__ = ["main", "encode_captions", "read_captions_file", "EmbeddingStore"]


# The tool's own FlagValues: main(argv) may run more than once in a process, beside other tools.
FLAGS = flags.FlagValues()
_F = dict(flag_values=FLAGS)
flags.DEFINE_string("t5", None, "T5X checkpoint dir / msgpack file, or HF safetensors.", **_F)
flags.DEFINE_string("vocab", None, "T5's SentencePiece model file.", **_F)
flags.DEFINE_string("captions_file", None, "UTF-8 text file, one caption per line (or give --tfds).", **_F)
flags.DEFINE_string("tfds", None, "TFDS dataset name (needs tensorflow-datasets; or give --captions_file).", **_F)
flags.DEFINE_string("split", "train", "TFDS split.", **_F)
flags.DEFINE_string("caption_key", "caption", "TFDS feature holding the caption(s); '/' descends ('captions/text').",
                    **_F)
flags.DEFINE_string("data_dir", None, "TFDS data_dir.", **_F)
flags.DEFINE_string("out", None, "Output directory (created; resumed if present).", **_F)
flags.DEFINE_integer("batch_size", 64, "Captions per encoder batch.", lower_bound=1, **_F)
flags.DEFINE_integer("max_length", 128, "Tokens per caption incl. EOS.", lower_bound=1, **_F)
flags.DEFINE_integer("shard_size", 4096, "Captions per part (one file pair).", lower_bound=1, **_F)
flags.DEFINE_integer("process_index", None, "This host's number (default jax.process_index()): it encodes chunks "
                     "i, i+P, ... (give with --process_count).", lower_bound=0, **_F)
flags.DEFINE_integer("process_count", None, "Hosts sharing the work (default jax's).", lower_bound=1, **_F)
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"], "Parameter and compute dtype; auto: bfloat16 "
                  "on accelerators, float32 on CPU.", **_F)
flags.mark_flags_as_required(["t5", "vocab", "out"], flag_values=FLAGS)
flags.mark_flags_as_mutual_exclusive(["captions_file", "tfds"], required=True, flag_values=FLAGS)


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
    """The flags (default sys.argv[1:]) as a namespace; SystemExit(2) with one line on a bad flag,
    SystemExit(0) after --help."""
    f = cli.parse_own_flags(FLAGS, sys.argv[1:] if argv is None else argv, __doc__)
    args = types.SimpleNamespace(**f.flag_values_dict())

    def error(message):
        print(f"encode_text: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)

    if (args.process_index is None) != (args.process_count is None):
        error("--process_index and --process_count go together")
    if args.process_count is not None and not 0 <= args.process_index < args.process_count:
        error(f"--process_index must be in [0, --process_count), got {args.process_index} of {args.process_count}")
    return args


# --------------------------------------------------------------------------- caption sources


def read_captions_file(path: str) -> list[str]:
    """One caption per line (local or gs://), normalised; empty lines skipped."""
    lines = (store_lib.normalize_caption(line) for line in paths.read_text(path).splitlines())
    return [line for line in lines if line]


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
            text = store_lib.normalize_caption(text)
            if text:
                yield text


def _dedupe(captions: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(captions))


# --------------------------------------------------------------------------- encoding


def _model_fingerprint(encoder: TextEncoder) -> str:
    return store_lib.model_fingerprint(encoder.config, encoder.params)


def _vocab_digest(vocab_path) -> str | None:
    """SHA-256 of the SentencePiece model: another vocabulary gives other token ids, so a resume
    with it would mix two encodings."""
    if not vocab_path:
        return None
    from etils import epath

    return hashlib.sha256(epath.Path(vocab_path).read_bytes()).hexdigest()


def check_out(out: str) -> None:
    """--out must be creatable; an existing non-empty one must be an embedding store (appending writes
    into it, so it is never another tool's directory)."""
    cli.check_output(out, "--out")
    if not paths.is_remote(out) and paths.isdir(out) and paths.listdir(out) \
            and not paths.exists(paths.join(out, store_lib.META)):
        store_lib._check_not_old_format(out)
        raise cli.UsageError(f"--out {out} exists and is not an embedding store (no {store_lib.META}); "
                             "give a new or empty directory")


def encode_captions(encoder: TextEncoder, captions: Sequence[str], out: str, *,
                    batch_size: int = 64, shard_size: int = 4096, t5_path: str = "",
                    progress: bool = True, process_index: int = 0, process_count: int = 1) -> dict:
    """Encode unique, normalised `captions` into the store at `out` (created or appended to): this host
    encodes chunks process_index, process_index + process_count, ... of `shard_size` captions, skipping
    finished parts and captions the store held before. Returns a summary dict."""
    from tqdm import tqdm

    captions = list(dict.fromkeys(store_lib.normalize_caption(c) for c in captions))
    meta = store_lib.create(out, {
        "max_length": encoder.max_length, "d_model": encoder.dim,
        "model_sha256": _model_fingerprint(encoder),
        "vocab_sha256": _vocab_digest(encoder.tokenizer.vocab_path),
        "t5": t5_path, "vocab": encoder.tokenizer.vocab_path})
    run_id = store_lib.captions_digest(captions)[:16]  # a restarted run finds its own parts by name
    num_chunks = -(-len(captions) // shard_size)
    mine = range(process_index, num_chunks, process_count)
    todo = [k for k in mine if not store_lib.part_done(out, f"{run_id}-{k:06d}")]
    if len(todo) < len(mine):
        log.info("resuming: %d of this host's %d parts already done", len(mine) - len(todo), len(mine))
    before = EmbeddingStore(out)  # parts written earlier (other runs): their captions are not redone
    encoded = 0
    remaining = sum(len(captions[k * shard_size:(k + 1) * shard_size]) for k in todo)
    with tqdm(total=remaining, unit="caption", disable=not progress, desc="encode_text") as bar:
        for k in todo:
            chunk = list(captions[k * shard_size:(k + 1) * shard_size])
            new = [c for c, held in zip(chunk, before.contains(chunk)) if not held]
            bar.update(len(chunk) - len(new))
            embs, masks = [], []
            for start in range(0, len(new), batch_size):
                emb, mask = encoder.encode(new[start:start + batch_size])
                # Cast on device: half the bytes to move to the host.
                embs.append(np.asarray(emb.astype("bfloat16")))
                masks.append(np.asarray(mask))
                bar.update(len(emb))
            shape = (0, encoder.max_length)
            store_lib.write_part(out, f"{run_id}-{k:06d}", new,
                                 np.concatenate(embs) if embs else np.zeros(shape + (encoder.dim,), np.float32),
                                 np.concatenate(masks) if masks else np.zeros(shape, bool))
            encoded += len(new)
    before.close()
    return {**meta, "count": len(captions), "encoded": encoded, "num_shards": num_chunks,
            "parts_this_host": len(mine)}


def _make_mesh():
    import jax
    from jax.sharding import Mesh

    # This host's devices only: hosts encode their own shares independently.
    if jax.local_device_count() == 1:
        return None
    return Mesh(np.array(jax.local_devices()), ("data",))


def run(args) -> dict:
    import jax
    import jax.numpy as jnp

    from imagen_jax import parallel

    check_out(args.out)
    paths.check_bucket(args.out)
    parallel.maybe_initialize_distributed()  # on a pod (launch/tpu.sh), before jax is first used
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
                            shard_size=args.shard_size, t5_path=args.t5,
                            process_index=jax.process_index() if args.process_index is None else args.process_index,
                            process_count=jax.process_count() if args.process_count is None else args.process_count)
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
          f"({index['encoded']} encoded by this host in {index['parts_this_host']} parts; "
          f"{index['num_truncated']} truncated to {index['max_length']} tokens this run)")
    return 0


def console_main():
    sys.exit(main())


if __name__ == "__main__":
    console_main()
