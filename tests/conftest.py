"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(ROOT), "shared", "fixtures")


@pytest.fixture(scope="session")
def fixtures_dir():
    if not os.path.isdir(FIXTURES):
        raise FileNotFoundError(f"shared fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny base64 workdir (random parameters, the demo vocabulary), built once per session."""
    from stage_utils import make_workdir, shapes_vocab

    root = tmp_path_factory.mktemp("tiny_base")
    make_workdir(root / "base64", "base64", vocab=shapes_vocab(root), seed=0)
    return str(root / "base64")

