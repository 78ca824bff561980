"""The installable package: pyproject's dependencies match the requirements files, and the wheel,
installed into a fresh venv outside the checkout, runs its console scripts and finds configs by name."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _requirements(path):
    """{normalised name: the requirement with extras and specifier, spaces removed}."""
    out = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if line:
            out[_name(line)] = line.replace(" ", "")
    return out


def _name(req):
    return re.split(r"[\[<>=!~ ;]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_pyproject_matches_requirements():
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    extras = project["optional-dependencies"]
    declared = {_name(r): r.replace(" ", "") for r in project["dependencies"] + extras["data"]}
    assert declared == _requirements(os.path.join(ROOT, "requirements.txt"))
    # TensorFlow is the data pipeline's alone: a plain install does not pull it in.
    assert not any(_name(r).startswith("tensorflow") for r in project["dependencies"])
    test = {_name(r): r.replace(" ", "") for r in extras["test"]}
    assert test == {k: v for k, v in _requirements(os.path.join(ROOT, "requirements-test.txt")).items()
                    if k != "setuptools"}  # setuptools builds the wheel in test_wheel_installs_and_samples
    tools = {"train", "sample", "export", "evaluate_fid", "encode_text", "inspect", "demo"}
    assert set(project["scripts"]) == {"imagen-" + t.replace("_", "-") for t in tools}
    for script, target in project["scripts"].items():
        module, func = target.split(":")
        assert func == "console_main" and module == "imagen_jax." + script[len("imagen-"):].replace("-", "_")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin dir of a fresh venv holding only the wheel, a neutral working directory)."""
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"  # a copy: setuptools' build/ and egg-info never land in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("imagen_jax", "configs"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        str(src), "-w", str(root / "dist")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (root / "dist").iterdir()
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies come from this venv (offline, fast); the package itself only from the wheel.
    with open(os.path.join(site, "deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                        "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cwd = root / "elsewhere"
    cwd.mkdir()
    return venv / "bin", cwd


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "VIRTUAL_ENV")}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_wheel_installs_and_samples(installed, tiny_base, tmp_path):
    bindir, cwd = installed
    wd = tiny_base
    out = tmp_path / "samples"
    env = _env()
    run = lambda *cmd: subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,  # noqa: E731
                                        stderr=subprocess.PIPE, text=True)
    procs = {
        "where": run(bindir / "python", "-c", "import imagen_jax, configs; print(imagen_jax.__file__); "
                     "print(configs.__file__)"),
        "help": run(bindir / "imagen-sample", "--help"),
        "inspect": run(bindir / "imagen-inspect", "--config=base64:tiny"),
        "sample": run(bindir / "imagen-sample", f"--stages={wd}", "--prompt=a red circle", f"--out={out}",
                      "--num_images=2", "--steps=2"),
    }
    res = {k: (p.wait(timeout=300), *p.communicate()) for k, p in procs.items()}
    for k, (rc, stdout, stderr) in res.items():
        assert rc == 0, f"{k}: {stderr[-3000:]}"
    # Both import from the fresh venv, not from the checkout.
    venv = str(bindir.parent)
    assert all(p.startswith(venv) for p in res["where"][1].split()), res["where"][1]
    assert "--stages" in res["help"][1] and "--batch_size" in res["help"][1]
    assert re.search(r"^params=\d+$", res["inspect"][1], re.M), res["inspect"][1][-2000:]
    imgs = sorted(os.listdir(out / "images"))
    assert imgs == ["0000_00.png", "0000_01.png"]
    assert np.asarray(Image.open(out / "images" / imgs[0])).shape == (16, 16, 3)
    assert (out / "settings.json").exists() and (out / "grid.png").exists()
