"""Inference bundles (imagen_jax.bundle / imagen_jax.export): round trip of every tiny stage in
EMA/raw x bfloat16/float32 against the checkpoint's own parameters and U-Net outputs, byte-identical
export of a state sharded over 8 devices, atomicity and refusals, corrupted bundles, and sampling
from a bundle without its workdir."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import stage_utils
from imagen_jax import bundle, cascade, checkpoints, export, parallel, training
from imagen_jax.models import UNet, UNetConfig, init_inputs

STAGES = ("base64", "sr256", "sr1024")
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


def one_device_mesh():
    return parallel.make_mesh(ONE_DEVICE, devices=jax.devices()[:1])


def write_workdir(workdir, stage, *, step=3, seed=0, vocab=None, **overrides):
    """A workdir like stage_utils.make_workdir's (config.json + one orbax checkpoint) whose random
    parameters are drawn on the host: no XLA compilation, so a workdir costs about a second on a
    2-core CPU. EMA and raw parameters differ, so the tests can tell which one was exported."""
    c = stage_utils.tiny_config(stage, **overrides)
    if vocab:
        c.text.vocab = vocab
    trainer = training.Trainer(c, one_device_mesh())
    rng = np.random.default_rng(seed)

    def draw(path, x):
        v = 0.05 * rng.normal(size=x.shape).astype(np.float32)
        return v + 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else v

    params = jax.tree_util.tree_map_with_path(draw, trainer.abstract_params)
    ema = jax.tree_util.tree_map_with_path(draw, trainer.abstract_params)
    opt = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), trainer.abstract_state.opt_state)
    state = training.TrainState(step=np.int32(step), params=params, ema_params=ema, opt_state=opt,
                                nonfinite_step=np.int32(-1))
    state = jax.device_put(state, trainer.state_shardings)
    checkpoints.save_config(str(workdir), c)
    mngr = checkpoints.manager(str(workdir), async_save=False)
    checkpoints.save(mngr, step, state, {"step": step, "data_position": step})
    mngr.wait_until_finished()
    mngr.close()
    return str(workdir)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def workdirs(root):
    """base64: config.text.vocab set; sr256: WORKDIR/vocab/shapes_spm.model; sr1024: no vocabulary
    yet (the export trains the deterministic demo one into the bundle)."""
    vocab = stage_utils.shapes_vocab(root)
    out = {"base64": write_workdir(root / "wd_base64", "base64", vocab=vocab),
           "sr256": write_workdir(root / "wd_sr256", "sr256", seed=1),
           "sr1024": write_workdir(root / "wd_sr1024", "sr1024", seed=2)}
    os.makedirs(root / "wd_sr256" / "vocab")
    shutil.copyfile(vocab, root / "wd_sr256" / "vocab" / "shapes_spm.model")
    return out


def checkpoint_params(workdir, which, mesh):
    config = checkpoints.load_config(workdir)
    abstract, shardings = cascade.param_shardings(config, mesh)
    return checkpoints.restore_params(workdir, abstract, shardings, which=which)[0]


def unet_fn(config):
    cfg = UNetConfig.from_dict(config.model.to_dict())
    model = UNet(cfg)
    rng = np.random.default_rng(0)
    inputs = init_inputs(cfg, batch=2, text_len=int(config.text.max_length), image_size=int(config.data.image_size))
    inputs = {k: (jnp.asarray(rng.normal(size=v.shape), v.dtype) if v.dtype != bool else v) for k, v in inputs.items()}
    fn = jax.jit(lambda p: model.apply({"params": p}, **inputs))
    dev = jax.devices()[0]  # one placement for every tree: one compilation per parameter dtype
    return lambda p: np.asarray(fn(jax.device_put(p, dev)))


def files_digest(path):
    out = {}
    for d, _, names in os.walk(path):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def tensor_bytes(path):
    """{name: (dtype, shape, raw bytes)} over all safetensors files of a bundle, and the files' bytes."""
    tensors, raw = {}, {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb") as f:
                raw[name] = f.read()
            with safe_open(os.path.join(path, name), framework="numpy") as h:
                for k in h.keys():
                    x = h.get_tensor(k)
                    tensors[k] = (x.dtype, x.shape, x.tobytes())
    return tensors, raw


# ------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("stage", STAGES)
def test_round_trip_matches_checkpoint(stage, workdirs, root):
    workdir = workdirs[stage]
    mesh = one_device_mesh()
    config = checkpoints.load_config(workdir)
    apply = unet_fn(config)
    refs = {kind: checkpoint_params(workdir, bundle.PARAM_KINDS[kind], mesh) for kind in ("ema", "raw")}
    ref_out = {kind: apply(p) for kind, p in refs.items()}
    assert not np.array_equal(ref_out["ema"], ref_out["raw"])
    for kind in ("ema", "raw"):
        for dtype in ("float32", "bfloat16"):
            out = str(root / f"bundle_{stage}_{kind}_{dtype}")
            info = bundle.export(workdir, out, params=kind, dtype=dtype, progress=False, log=None)
            assert (info["step"], info["params"], info["dtype"], info["stage"]) == (3, kind, dtype, stage)
            cfg, params, info2 = bundle.load(out, mesh=mesh)
            assert info2 == info
            assert cfg.model.to_dict() == config.model.to_dict()
            assert os.path.isfile(cfg.text.vocab) and cfg.text.vocab.startswith(out)
            got, want = bundle.flatten(params), bundle.flatten(refs[kind])
            assert sorted(got) == sorted(want)
            assert info["param_count"] == sum(x.size for x in want.values())
            if dtype == "float32":
                for name in want:
                    assert got[name].dtype == jnp.float32
                    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)
                np.testing.assert_array_equal(apply(params), ref_out[kind])
            else:
                rounded = {k: jnp.asarray(v).astype(jnp.bfloat16) for k, v in want.items()}
                for name in want:
                    assert got[name].dtype == jnp.bfloat16
                    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(rounded[name]), err_msg=name)
                if kind == "ema" and stage != "sr256":  # sr256 is base64's architecture plus a low-res
                    # input; one compilation less. The U-Net computes in float32 from bfloat16 weights:
                    back = bundle.unflatten({k: v.astype(jnp.float32) for k, v in rounded.items()})
                    np.testing.assert_array_equal(apply(params), apply(back))


def test_layout_names_and_shards(workdirs, root, capsys):
    out = str(root / "sharded_base64")
    assert export.main(["--workdir", workdirs["base64"], "--out", out, "--dtype", "float32",
                        "--max_shard_bytes", "200000", "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    info = bundle.read_info(out)
    n = len(info["weight_files"])
    assert n > 2 and info["weight_files"][0] == f"model-00001-of-{n:05d}.safetensors"
    assert line == (f"exported {info['param_count']} params (ema, float32) from step 3 to {out}: "
                    f"{bundle.human_bytes(info['bundle_bytes'])} in {n} files")
    with open(os.path.join(out, bundle.INDEX_FILE)) as f:
        wm = json.load(f)["weight_map"]
    assert "down0_res0/conv1/kernel" in wm and set(wm.values()) == set(info["weight_files"])
    assert set(info["files"]) == set(info["weight_files"]) | {bundle.INDEX_FILE, "config.json",
                                                              "vocab/shapes_spm.model"}
    for fname in info["weight_files"]:  # files no bigger than the limit unless one tensor is
        with safe_open(os.path.join(out, fname), framework="numpy") as h:
            sizes = [h.get_tensor(k).nbytes for k in h.keys()]
        assert sum(sizes) <= 200000 or len(sizes) == 1
    single, _ = tensor_bytes(str(root / "bundle_base64_ema_float32"))
    split, _ = tensor_bytes(out)
    assert single == split
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["text"]["vocab"] == "vocab/shapes_spm.model"


# ------------------------------------------------------------------------------- sharded state
def test_sharded_export_equals_single_device(workdirs, root):
    """The same checkpoint restored over data=2 x fsdp=2 x tensor=2 (replicas, fsdp and tensor
    splits), written by the one-host path and by the per-slice path that multi-host export uses,
    gives byte-identical files to a one-device export."""
    workdir = workdirs["sr256"]
    mesh8 = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = checkpoint_params(workdir, "ema_params", mesh8)
    specs = {tuple(x.sharding.spec) for x in jax.tree_util.tree_leaves(sharded)}
    assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)
    for dtype in ("bfloat16", "float32"):
        one = str(root / f"one_{dtype}")
        bundle.export(workdir, one, dtype=dtype, mesh=one_device_mesh(), max_shard_bytes=60000, progress=False,
                      log=None)
        ref_tensors, ref_raw = tensor_bytes(one)
        assert len(ref_raw) > 2
        for assemble in (True, False):
            out = str(root / f"eight_{dtype}_{assemble}")
            bundle.export(workdir, out, dtype=dtype, mesh=mesh8, max_shard_bytes=60000, progress=False, log=None,
                          _assemble=assemble)
            tensors, raw = tensor_bytes(out)
            assert tensors == ref_tensors
            assert raw == ref_raw


def test_load_into_given_shardings(workdirs, root):
    path = str(root / "bundle_sr1024_raw_float32")
    mesh8 = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, want = cascade.param_shardings(checkpoints.load_config(workdirs["sr1024"]), mesh8)
    _, params, _ = bundle.load(path, mesh=mesh8, verify=False)
    for x, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want)):
        assert x.sharding == s
    ref = checkpoint_params(workdirs["sr1024"], "params", one_device_mesh())
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    single = jax.sharding.SingleDeviceSharding(jax.devices()[3])
    _, params, _ = bundle.load(path, shardings=single)
    assert all(x.sharding == single for x in jax.tree_util.tree_leaves(params))


# ------------------------------------------------------------------------------- bad input
def run_cli(args, capsys):
    rc = export.main(args)
    err = capsys.readouterr().err
    return rc, err


def no_partials(parent):
    return [n for n in os.listdir(parent) if ".partial-" in n or ".old-" in n]


def test_bad_workdir_and_step(workdirs, root, capsys, tmp_path):
    empty = tmp_path / "no_ckpt"
    checkpoints.save_config(str(empty), stage_utils.tiny_config("base64"))
    rc, err = run_cli(["--workdir", str(empty), "--out", str(tmp_path / "b")], capsys)
    assert rc == 1 and err.startswith("error: no checkpoints in") and "Traceback" not in err
    rc, err = run_cli(["--workdir", str(tmp_path / "absent"), "--out", str(tmp_path / "b")], capsys)
    assert rc == 1 and "does not exist" in err
    rc, err = run_cli(["--workdir", workdirs["base64"], "--out", str(tmp_path / "b"), "--step", "7"], capsys)
    assert rc == 1 and err.strip() == f"error: step 7 is not among the checkpoints of {workdirs['base64']}: [3]"
    assert export.main(["--workdir", workdirs["base64"], "--out", str(tmp_path / "b"), "--dtype", "int8"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["no_ckpt"]


def test_existing_output_refused_unless_overwrite(workdirs, tmp_path, capsys, monkeypatch):
    workdir = workdirs["sr256"]
    out = str(tmp_path / "bundle")
    assert export.main(["--workdir", workdir, "--out", out, "--quiet"]) == 0
    capsys.readouterr()
    before = files_digest(out)
    rc, err = run_cli(["--workdir", workdir, "--out", out, "--params", "raw"], capsys)
    assert rc == 1 and err.strip() == f"error: output {out} exists (pass --overwrite to replace it)"
    assert files_digest(out) == before

    # An export that dies half-way leaves the old bundle as it was and no partial directory.
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) > 3:
            raise OSError("disk full (simulated)")
        return write_param(*args, **kw)

    write_param = bundle.write_param
    monkeypatch.setattr(bundle, "write_param", failing)
    with pytest.raises(OSError, match="simulated"):
        bundle.export(workdir, out, params="raw", overwrite=True, progress=False, log=None)
    with pytest.raises(OSError, match="simulated"):
        bundle.export(workdir, str(tmp_path / "fresh"), progress=False, log=None)
    monkeypatch.undo()
    assert files_digest(out) == before and not no_partials(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["bundle"]

    rc, err = run_cli(["--workdir", workdir, "--out", out, "--params", "raw", "--overwrite", "--quiet"],
                      capsys)
    assert rc == 0 and bundle.read_info(out)["params"] == "raw" and not no_partials(str(tmp_path))

    # --overwrite replaces a bundle, never some other directory, nor the workdir itself.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    rc, err = run_cli(["--workdir", workdir, "--out", str(other), "--overwrite"], capsys)
    assert rc == 1 and "is not a bundle" in err and (other / "keep.txt").read_text() == "mine"
    rc, err = run_cli(["--workdir", workdir, "--out", workdir, "--overwrite"], capsys)
    assert rc == 1 and "overlaps the workdir" in err
    rc, err = run_cli(["--workdir", workdir, "--out", os.path.join(workdir, "checkpoints", "b")], capsys)
    assert rc == 1 and "overlaps the workdir" in err
    assert checkpoints.available_steps(workdir) == [3]


def test_missing_or_corrupted_shard(workdirs, root, tmp_path):
    src = str(root / "sharded_base64")
    missing, corrupt = str(tmp_path / "missing"), str(tmp_path / "corrupt")
    shutil.copytree(src, missing)
    shutil.copytree(src, corrupt)
    files = bundle.read_info(src)["weight_files"]
    os.remove(os.path.join(missing, files[1]))
    name = files[-1]
    with open(os.path.join(corrupt, name), "r+b") as f:
        f.seek(-3, os.SEEK_END)
        b = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(bundle.BundleError, match=f"incomplete: {files[1]} is missing"):
        bundle.load(missing, mesh=one_device_mesh())
    with pytest.raises(bundle.BundleError, match=r"incomplete: .* is missing"):
        bundle.load(missing, mesh=one_device_mesh(), verify=False)
    with pytest.raises(bundle.BundleError, match=f"checksum mismatch for {name}"):
        bundle.load(corrupt, mesh=one_device_mesh())
    # The sample CLI reports it in one line and exits non-zero, before any compilation.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "imagen_jax.sample", f"--stages={corrupt}", "--prompt=a red circle",
                           f"--out={tmp_path / 'imgs'}"], cwd=os.path.dirname(os.path.dirname(bundle.__file__)),
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert f"error: bundle {corrupt}: checksum mismatch for {name}" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "imgs")


# ------------------------------------------------------------------------------- sampling
def test_sample_from_bundle_without_workdir(tmp_path):
    try:  # the library form of the sample CLI
        from imagen_jax.sampling import generate
    except ImportError:
        from imagen_jax.sample import generate

    vocab = stage_utils.shapes_vocab(tmp_path)
    # An even smaller U-Net than base64:tiny: two sampler compilations dominate this test.
    workdir = write_workdir(tmp_path / "wd", "base64", vocab=vocab, seed=5, **{
        "model.base_channels": 16, "model.attn_levels": (False, False), "model.num_res_blocks": (1, 0)})
    out = str(tmp_path / "bundle")
    bundle.export(workdir, out, dtype="float32", progress=False, log=None)
    kw = dict(num_images=2, seed=3, steps="2", log=lambda *a: None)
    from_workdir = generate([workdir], ["a red circle"], str(tmp_path / "s1"), **kw)
    os.rename(workdir, str(tmp_path / "wd_moved"))
    os.rename(vocab, vocab + ".moved")
    from_bundle = generate([out], ["a red circle"], str(tmp_path / "s2"), **kw)
    assert from_bundle.shape == (2, 16, 16, 3) and from_bundle.std() > 0
    np.testing.assert_array_equal(from_bundle, from_workdir)
    with open(tmp_path / "s2" / "settings.json") as f:
        assert json.load(f)["stages"][0]["source"] == out
