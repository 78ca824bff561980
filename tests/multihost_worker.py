"""One process of the multi-host test (run by test_multihost.py): 2 train steps of the tiny SR1024
stage on a data-parallel mesh over every process's devices, each process feeding its own half of
the global batch. With a vocabulary path as argv[1], also builds a training batch's text from a
tiny random T5 run on the fly both ways (the encoder's global arrays, and this host's rows copied
through the host) and gathers the two. Prints the losses (and that comparison) as JSON on the last line."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from imagen_jax import parallel, training  # noqa: E402
from stage_utils import tiny_config  # noqa: E402


def main():
    parallel.maybe_initialize_distributed()
    c = tiny_config("sr1024")
    mesh = parallel.make_mesh({"data": -1})
    tr = training.Trainer(c, mesh)
    state = tr.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    gb = 8
    per = gb // jax.process_count()
    lo = jax.process_index() * per
    losses = []
    for _ in range(2):
        full = {"image": np.tanh(rng.normal(size=(gb, 32, 32, 3))).astype(np.float32),
                "lowres": np.tanh(rng.normal(size=(gb, 8, 8, 3))).astype(np.float32),
                "text": rng.normal(size=(gb, 16, 64)).astype(np.float32),
                "text_mask": np.ones((gb, 16), bool)}
        local = {k: v[lo:lo + per] for k, v in full.items()}
        state, m = tr.step(state, parallel.host_local_batch_to_global(local, mesh), jax.random.PRNGKey(1))
        losses.append(float(m["loss"]))
    out = {"process": jax.process_index(), "devices": jax.device_count(), "losses": losses}
    if len(sys.argv) > 1:
        out.update(t5_batch(sys.argv[1], mesh, per, lo))
    print(json.dumps(out))


def t5_batch(vocab, mesh, per, lo):
    from jax.experimental import multihost_utils

    from imagen_jax.text.encoder import TextEncoder

    enc = TextEncoder.random(vocab, max_length=16, mesh=mesh, batch_axis=None)
    captions = [f"a {c} circle at the {p}" for c in ("red", "blue") for p in ("top", "left", "right", "bottom")]
    captions = captions[lo:lo + per]  # this host's share of a global batch of 8
    emb, mask = enc.encode(captions, global_arrays=True)
    direct = parallel.host_local_batch_to_global({"text": emb, "text_mask": mask}, mesh)
    local_emb, local_mask = enc.encode(captions)  # this host's rows
    via_host = parallel.host_local_batch_to_global({"text": np.asarray(local_emb), "text_mask": np.asarray(local_mask)},
                                                   mesh)
    gather = lambda b: {k: multihost_utils.process_allgather(v, tiled=True) for k, v in b.items()}  # noqa: E731
    a, b = gather(direct), gather(via_host)
    return {"t5_global": not direct["text"].is_fully_addressable or jax.process_count() == 1,
            "t5_same_batch": all(np.array_equal(a[k], b[k]) for k in a),
            "t5_text_sum": float(np.abs(a["text"]).sum())}


if __name__ == "__main__":
    main()
