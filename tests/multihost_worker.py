"""One process of the multi-host test (run by test_multihost.py): 2 train steps of the tiny SR1024
stage on a data-parallel mesh over every process's devices, each process feeding its own half of
the global batch. Prints the losses as JSON on the last line."""
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
    print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(), "losses": losses}))


if __name__ == "__main__":
    main()
