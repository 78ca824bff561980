"""Cascade sampling CLI: 3-stage end to end, determinism, stage-only output, bad input."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from imagen_jax import cascade, sampling
from stage_utils import make_workdir, shapes_vocab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("base64", "sr256", "sr1024")  # tiny: 16 -> 64 -> 256


@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    vocab = shapes_vocab(root)
    for i, s in enumerate(STAGES):
        make_workdir(root / s, s, vocab=vocab, seed=i)
    (root / "empty").mkdir()
    return {s: str(root / s) for s in STAGES + ("empty",)}


def test_three_stage_cascade_writes_pngs_and_json_deterministically(stage_dirs, tmp_path):
    dirs = [stage_dirs[s] for s in STAGES]
    prompts = ["a red circle", "a large blue square on the left"]
    kw = dict(num_images=2, seed=3, steps="4,3,2", guidance="3,2,1", sampler="ddim")
    a = sampling.generate(dirs, prompts, str(tmp_path / "a"), **kw)
    b = sampling.generate(dirs, prompts, str(tmp_path / "b"), **kw)
    assert a.shape == (4, 256, 256, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    files = sorted(os.listdir(tmp_path / "a" / "images"))
    assert files == ["0000_00.png", "0000_01.png", "0001_00.png", "0001_01.png"]
    img = np.asarray(Image.open(tmp_path / "a" / "images" / "0001_01.png"))
    np.testing.assert_array_equal(img, a[3])
    assert Image.open(tmp_path / "a" / "grid.png").size == (512, 512)
    rec = json.load(open(tmp_path / "a" / "settings.json"))
    assert rec["seed"] == 3 and rec["prompts"] == prompts
    assert [s["steps"] for s in rec["stages"]] == [4, 3, 2]
    assert [s["resolution"] for s in rec["stages"]] == [16, 64, 256]
    assert [s["thresholding"] for s in rec["stages"]] == ["dynamic"] * 3
    # A different seed gives different images; the samples are not constant.
    c = sampling.generate(dirs, prompts, str(tmp_path / "c"), **dict(kw, seed=4))
    assert not np.array_equal(a, c)
    assert a.std() > 1.0
    assert not os.path.exists(str(tmp_path / "a") + ".partial")


def test_with_params_reuses_the_program_with_the_new_parameters(stage_dirs):
    # What training previews rely on: other parameters, the same compiled program, and the images
    # of a sampler built from scratch for those parameters.
    from stage_utils import count_lowerings
    from imagen_jax import parallel

    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    stage = cascade.load_stage(stage_dirs["base64"], mesh)
    settings = cascade.StageSettings(sampler="ddim", steps=3, guidance=2.0, thresholding="dynamic")
    rng = np.random.default_rng(0)
    text = rng.normal(size=(8, 16, stage.model_cfg.text_dim)).astype(np.float32)
    mask = np.arange(16)[None, :] < rng.integers(2, 16, (8, 1))
    key = jax.random.PRNGKey(1)
    other = jax.tree_util.tree_map(lambda x: x * 1.5, stage.params)
    sampler = cascade.StageSampler(stage, mesh, settings)
    first = np.asarray(sampler(text, mask, None, key))
    with count_lowerings("_sample") as lowered:
        reused = sampler.with_params(other, step=7)
        again = np.asarray(reused(text, mask, None, key))
    assert lowered["count"] == 0 and reused.stage.step == 7 and sampler.stage.params is stage.params
    fresh = np.asarray(cascade.StageSampler(dataclasses.replace(stage, params=other), mesh, settings)(
        text, mask, None, key))
    np.testing.assert_array_equal(again, fresh)
    assert np.abs(again - first).max() > 1e-3


def test_base_stage_only_outputs_base_resolution(stage_dirs, tmp_path):
    # Also: the config's sampling block supplies the defaults (issue 16 item 8), --dtype reaches the stage.
    import shutil
    base = tmp_path / "base"
    shutil.copytree(stage_dirs["base64"], base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["sampling"].update(thresholding="static", percentile=97.0)
    cfg["model"]["dtype"] = "bfloat16"  # --dtype overrides it (float32 keeps this test's compile cheap)
    (base / "config.json").write_text(json.dumps(cfg))
    out = sampling.generate([str(base)], ["a green triangle"], str(tmp_path / "o"), steps="3", dtype="float32")
    assert out.shape == (1, 16, 16, 3)
    rec = json.load(open(tmp_path / "o" / "settings.json"))["stages"][0]
    assert (rec["thresholding"], rec["percentile"], rec["steps"], rec["dtype"]) == ("static", 97.0, 3, "float32")
    with pytest.raises(sampling.UsageError, match="--dtype 'int8'"):
        sampling.generate([str(base)], ["a red circle"], str(tmp_path / "p"), dtype="int8")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("case,message", [
    ("wrong_order", "wrong order"),
    ("no_checkpoint", "not a training workdir"),
    ("guidance_len", "--guidance has 2 values"),
    ("exists", "exists"),
])
def test_bad_input(stage_dirs, tmp_path, case, message):
    dirs = [stage_dirs[s] for s in STAGES]
    out = tmp_path / "out"
    kw = {}
    if case == "wrong_order":
        dirs = [dirs[0], dirs[2], dirs[1]]
    elif case == "no_checkpoint":
        dirs = [stage_dirs["empty"]]
    elif case == "guidance_len":
        kw = dict(guidance="1,2")
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=message):
        sampling.generate(dirs, ["a red circle"], str(out), steps="2", **kw)
    if case == "exists":
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists() and not os.path.exists(str(out) + ".partial")


def test_cli_empty_prompts_and_wrong_stage_exit_nonzero(stage_dirs, tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "imagen_jax.sample", f"--prompts_file={empty}",
                        f"--stages={stage_dirs['base64']}", f"--out={tmp_path / 'o'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no prompts" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "imagen_jax.sample", "--prompt=a red circle",
                        f"--stages={stage_dirs['sr256']}", f"--out={tmp_path / 'o'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "super-resolution stage" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_check_chain_rejects_empty():
    with pytest.raises(cascade.CascadeError, match="no stages"):
        cascade.check_chain([])


def _stage(name, **sampling):
    from stage_utils import tiny_config
    c = tiny_config(name)
    c.sampling.update(sampling)
    return cascade.Stage(config=c, params=None, source=name, step=0)


def test_settings_come_from_each_stage_config_and_flags_override_them():
    # Issue 16 item 8: sampling.aug_level was never read, thresholding/percentile were fixed defaults.
    stages = [_stage("base64", thresholding="static", percentile=98.0),
              _stage("sr256", thresholding="none", percentile=97.0, aug_level=0.2),
              _stage("sr1024", aug_level=0.3)]
    got = sampling.settings_for(stages)
    assert [s.thresholding for s in got] == ["static", "none", "dynamic"]
    assert [s.percentile for s in got] == [98.0, 97.0, 99.5]
    assert [s.aug_level for s in got] == [0.0, 0.2, 0.3]
    assert [s.steps for s in got] == [int(st.config.sampling.steps) for st in stages]
    got = sampling.settings_for(stages, thresholding="dynamic", percentile=99.9, aug_level="0.1,0")
    assert [(s.thresholding, s.percentile, s.aug_level) for s in got] == [
        ("dynamic", 99.9, 0.0), ("dynamic", 99.9, 0.1), ("dynamic", 99.9, 0.0)]
    # A config written before these fields existed samples as before.
    old = _stage("sr256")
    for key in ("thresholding", "percentile", "aug_level"):
        del old.config.sampling[key]
    s = sampling.settings_for([stages[0], old])[1]
    assert (s.thresholding, s.percentile, s.aug_level) == ("dynamic", 99.5, 0.0)


def test_cli_and_fid_flags_default_to_the_stage_config():
    from imagen_jax import evaluate_fid
    from imagen_jax import sample  # noqa: F401  (defines the flags)
    from absl import flags
    for name in ("steps", "guidance", "sampler", "thresholding", "percentile", "aug_level", "dtype"):
        assert flags.FLAGS[name].default is None, name
    args = evaluate_fid.parse_args(["--stages=a", "--inception=i", "--coco=c", "--workdir=w"])
    assert (args.thresholding, args.percentile, args.aug_level, args.dtype) == (None, None, None, None)
