"""A gs:// T5X model directory resolves to its latest checkpoint_N, in either layout (orbax OCDBT
as current T5X writes it, legacy msgpack), read through tensorstore's gcs driver against the local
GCS API of tests/gcs_emulator.py."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from imagen_jax import paths
from imagen_jax.text import t5
from test_t5 import flat  # noqa: E402
from test_t5x_orbax import _nested, _write_orbax_t5x  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BUCKET = "t5x-test"


@pytest.fixture(scope="module")
def gcs():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # stdin held open: tests/gcs_emulator.py serves until its stdin closes.
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "gcs_emulator.py"), str(port), BUCKET],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "NO_GCE_CHECK": "true"}
    old = {k: os.environ.get(k) for k in env}
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.environ.update(env)
        yield url
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=30)


def test_gs_model_directory_loads_latest_step(gcs, fixtures_dir, tmp_path):
    legacy_file = os.path.join(fixtures_dir, "t5x", "test_t5_tiny.checkpoint_0")
    config, params = t5.load_checkpoint(legacy_file)
    want = {k: np.asarray(v) for k, v in flat(params).items()}
    # orbax layout: step 1 and a later step 4 with other weights.
    _write_orbax_t5x(tmp_path / "orbax", _nested(want), 1)
    _write_orbax_t5x(tmp_path / "orbax", _nested({k: v + 1 for k, v in want.items()}), 4)
    paths.upload_tree(str(tmp_path / "orbax"), f"gs://{BUCKET}/orbax")
    cfg, got = t5.load_checkpoint(f"gs://{BUCKET}/orbax")
    assert cfg == config
    for k in want:
        np.testing.assert_array_equal(np.asarray(flat(got)[k]), want[k] + 1, err_msg=k)
    # legacy layout: a model directory holding checkpoint_0/checkpoint (the msgpack T5X wrote).
    (tmp_path / "legacy" / "checkpoint_0").mkdir(parents=True)
    with open(legacy_file, "rb") as f:
        (tmp_path / "legacy" / "checkpoint_0" / "checkpoint").write_bytes(f.read())
    paths.upload_tree(str(tmp_path / "legacy"), f"gs://{BUCKET}/legacy")
    _, got = t5.load_checkpoint(f"gs://{BUCKET}/legacy")
    for k in want:
        np.testing.assert_array_equal(np.asarray(flat(got)[k]), want[k], err_msg=k)
