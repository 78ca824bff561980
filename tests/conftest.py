"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA compilation cache for the whole run (this process and every tool the tests
# start as a subprocess, which inherit the variable): many tests compile the same tiny stages' train
# and sampling programs, and on 2 cores compiling is most of the suite's time. A fresh directory per
# run, so nothing from an earlier checkout is reused.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="imagen_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

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

