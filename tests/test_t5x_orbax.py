"""T5X checkpoints written by current T5X (use_orbax=True): checkpoint_N/state/ is an orbax PyTree
checkpoint with OCDBT (PyTreeCheckpointHandler(use_ocdbt=True), item name 'state', step prefix
'checkpoint', the train state dict {'target': params, 'state': {'step', 'param_states'}}). Written
here with orbax that way from the legacy fixture T5X wrote; it must load to the same arrays, and a
model directory must resolve to its latest checkpoint_N."""
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from imagen_jax.text import t5
from imagen_jax.text.checkpoints import CheckpointError, open_encoder_arrays
from test_t5 import flat  # noqa: E402  (tests/ is on sys.path)


@pytest.fixture(scope="module")
def legacy(fixtures_dir):
    path = os.path.join(fixtures_dir, "t5x", "test_t5_tiny.checkpoint_0")  # msgpack written by T5X
    return path, t5.load_checkpoint(path)


def _write_orbax_t5x(model_dir, params, step, use_ocdbt=True):
    """What T5X's OrbaxCheckpointManager does on save (the dataset item left out)."""
    state = {"target": params,
             "state": {"step": np.asarray(step, np.int32),
                       "param_states": {"encoder": {"ghost": np.zeros((2,), np.float32)}}}}
    mngr = ocp.CheckpointManager(
        str(model_dir), item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)},
        options=ocp.CheckpointManagerOptions(step_prefix="checkpoint"))
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
    mngr.wait_until_finished()
    mngr.close()


def _nested(flat_params):
    out = {}
    for key, v in flat_params.items():
        *parents, leaf = key.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


@pytest.mark.parametrize("use_ocdbt", [True, False])
def test_orbax_checkpoint_matches_legacy(legacy, tmp_path, use_ocdbt):
    path, (config, params) = legacy
    want = flat(params)
    _write_orbax_t5x(tmp_path, _nested({k: np.asarray(v) for k, v in want.items()}), 1, use_ocdbt)
    # A later step with other weights: the model directory must pick it.
    _write_orbax_t5x(tmp_path, _nested({k: np.asarray(v) + 1 for k, v in want.items()}), 5, use_ocdbt)
    assert (tmp_path / "checkpoint_5" / "state" / "_METADATA").is_file()
    if use_ocdbt:
        assert (tmp_path / "checkpoint_5" / "state" / "manifest.ocdbt").is_file()
    for where in (tmp_path / "checkpoint_1", tmp_path / "checkpoint_1" / "state"):
        cfg, got = t5.load_checkpoint(str(where))
        assert cfg == config and flat(got).keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(np.asarray(flat(got)[k]), np.asarray(want[k]), err_msg=k)
    _, latest = t5.load_checkpoint(str(tmp_path))
    for k in want:
        np.testing.assert_array_equal(np.asarray(flat(latest)[k]), np.asarray(want[k]) + 1, err_msg=k)
    # Only the encoder is opened: the optimizer state of the train state is not an encoder array.
    assert not any("ghost" in k or k.startswith("state") for k in open_encoder_arrays(str(tmp_path)))


def test_orbax_without_encoder_is_refused(tmp_path):
    mngr = ocp.CheckpointManager(str(tmp_path), item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=True)},
                                 options=ocp.CheckpointManagerOptions(step_prefix="checkpoint"))
    mngr.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave({"target": {"decoder": {"w": np.ones(3)}}})))
    mngr.wait_until_finished()
    with pytest.raises(CheckpointError, match="without T5 encoder weights"):
        t5.load_checkpoint(str(tmp_path / "checkpoint_1"))


def _file_reads():
    import tensorstore as ts
    return sum(v.get("value", 0) for m in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/read")
               for v in m.get("values", []))


@pytest.mark.parametrize("layout", ["legacy", "orbax"])
def test_sharded_load_reads_each_chunk_once(legacy, tmp_path, layout):
    """Each of the 8 devices reads its own slice; the chunk cache (and revalidation at open only)
    makes that one read per chunk file, not one per slice (8x more before)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from test_t5 import write_t5x_zarr

    _, (config, params) = legacy
    want = flat(params)
    if layout == "legacy":
        path = write_t5x_zarr(params, str(tmp_path / "checkpoint_1"), ghost_optimizer_state=False)
        chunk_files = [f for d, _, fs in os.walk(path) for f in fs if f[0].isdigit()]
    else:
        _write_orbax_t5x(tmp_path, _nested({k: np.asarray(v) for k, v in want.items()}), 1, use_ocdbt=False)
        path = str(tmp_path / "checkpoint_1")
        chunk_files = [f for d, _, fs in os.walk(path) for f in fs if f[0].isdigit()]
    mesh = Mesh(np.asarray(jax.devices()), ("x",))

    def sharding(key, shape, dtype):  # split the first divisible dimension 8 ways
        dims = [i for i, n in enumerate(shape) if n % 8 == 0]
        spec = [None] * len(shape)
        if dims:
            spec[dims[0]] = "x"
        return NamedSharding(mesh, P(*spec))
    before = _file_reads()
    _, got = t5.load_checkpoint(path, shardings=sharding)
    reads = _file_reads() - before
    for k in want:
        np.testing.assert_array_equal(np.asarray(flat(got)[k]), np.asarray(want[k]), err_msg=k)
    # metadata (.zarray / _METADATA / manifests) + one read per chunk; 8 slices per chunk without the cache
    assert reads <= 2 * len(flat(got)) + len(chunk_files) + 4, (reads, len(chunk_files))
