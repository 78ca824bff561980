"""One process of test_text_data_multihost.py: a host of a two-host jax.distributed run over localhost.

argv: T5 VOCAB CAPTIONS_FILE STORE_DIR RECORDS_GLOB START_STEP. Runs the encode_text tool with no
--process_index/--process_count (so its share comes from jax.distributed), then reads this host's part of
global batch START_STEP of the TFRecord set the way train.py does (jax.process_index/process_count). Prints
{process, processes, encode_text exit code, caption ids and image sum of its batch} as JSON on the last line."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    t5, vocab, captions_file, store, files, start_step = sys.argv[1:]
    from imagen_jax import encode_text
    # encode_text initialises jax.distributed itself (IMAGEN_JAX_COORDINATOR ...), as on a pod.
    code = encode_text.main(["--t5", t5, "--vocab", vocab, "--captions_file", captions_file, "--out", store,
                             "--batch_size", "4", "--shard_size", "4", "--max_length", "16"])
    import jax

    from imagen_jax.data import pipeline
    from stage_utils import tiny_config
    c = tiny_config("base64", **{"data.source": "tfrecord", "data.files": files, "data.prefetch": 0,
                                 "data.image_size": 8})
    batch = next(pipeline.make_iterator(c, global_batch=4, process_index=jax.process_index(),
                                        process_count=jax.process_count(), start_step=int(start_step)))
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(), "encode_text": code,
                      "ids": [int(s.split()[-1]) for s in batch["captions"]],
                      "image_sum": float(batch["image"].astype("float64").sum())}))


if __name__ == "__main__":
    main()
