"""The trainer: each tiny stage trains, sharding equivalence, exact resume, SIGTERM, NaN halt,
bad input."""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from imagen_jax import checkpoints, parallel, training
from imagen_jax.training import loop as train_lib
from imagen_jax.data import pipeline
from stage_utils import count_lowerings, make_store, random_batch, shapes_vocab, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return shapes_vocab(tmp_path_factory.mktemp("vocab"))


def cfg(stage, vocab, **kw):
    base = {"train.num_steps": 4, "train.log_every": 1, "train.ckpt_every": 2, "train.batch_size": 8}
    base.update(kw)
    c = tiny_config(stage, **base)
    c.text.vocab = vocab
    return c


def params_of(workdir, which="params"):
    c = checkpoints.load_config(workdir)
    from imagen_jax import cascade
    mesh = parallel.make_mesh({"data": -1})
    abstract, sh = cascade.param_shardings(c, mesh)
    params, step = checkpoints.restore_params(workdir, abstract, sh, which=which)
    return jax.device_get(params), step


@pytest.mark.parametrize("stage", ["base64", "sr256", "sr1024"])
def test_each_tiny_stage_trains(tmp_path, vocab, stage):
    # Preview grids from the EMA params at step 3 (crop-trained SR1024 previews are skipped).
    c = cfg(stage, vocab, **{"train.num_steps": 3, "train.sample_every": 3, "sampling.steps": 2,
                             "train.peak_flops": 1e12})
    if stage == "base64":  # trains on an embedding store (issue 14), its T5 named for new prompts
        from imagen_jax.data import shapes
        captions = [shapes.ShapesDataset(seed=0, size=c.data.image_size)[i][1] for i in range(24)]
        stored = make_store(tmp_path_factory_root(tmp_path), vocab, captions)
        c.text.update(embeddings_dir=stored["store"], t5_checkpoint=stored["t5"])
        # Two full-size updates move the zero-initialised output layers enough that the samples depend on
        # the prompt (at the tiny config's warm-up they would not, to the uint8 level).
        c.optimizer.update(learning_rate=1e-2, warmup_steps=1)
    metrics, state = train_lib.train(c, str(tmp_path))
    # MFU = model FLOPs (3x forward) per device x steps/s / the configured peak.
    assert 0 < metrics["mfu"] < 1
    assert int(state.step) == 3
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert metrics["images_per_s_per_device"] > 0
    assert checkpoints.available_steps(str(tmp_path)) == [2, 3]
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
    if stage != "sr1024":
        from PIL import Image
        grid = Image.open(tmp_path / "samples" / "step_00000003.png")
        assert grid.size[0] >= c_size(stage) and np.asarray(grid).std() > 0
    if stage == "base64":
        # The trained stage samples a prompt its store lacks: the config's T5 encodes it, stored ones are read.
        from imagen_jax import cascade, sampling
        from imagen_jax.text.store import EmbeddingStore
        cond = sampling.StageConditioner([cascade.load_stage(str(tmp_path), parallel.make_mesh({"data": -1}))])
        new = "a huge purple star above a lake"
        assert new not in EmbeddingStore(stored["store"]) and "encoded by T5" in cond.description
        (emb,), (mask,) = cond([captions[3], new])
        np.testing.assert_array_equal(np.asarray(emb[0]), EmbeddingStore(stored["store"]).lookup([captions[3]])[0][0])
        ref, ref_mask = stored["enc"].encode([new])
        np.testing.assert_array_equal(np.asarray(emb[1]), np.asarray(ref[0]).astype(emb.dtype))
        np.testing.assert_array_equal(np.asarray(mask[1]), np.asarray(ref_mask[0]))
        samples_new_prompts(tmp_path, stored, new, captions[3])


def samples_new_prompts(workdir, stored, new, held):
    """`python -m imagen_jax.sample` on a stage trained on a store draws a prompt the store lacks: with the
    config's text.t5_checkpoint; with --t5 on a copy whose config names no T5 (the same image, bit for bit,
    and another image for another prompt at the same noise); and with neither it exits 1 on one line naming
    the prompt and both fixes, writing nothing."""
    import json
    import shutil

    from PIL import Image

    from forked_tools import run_tools
    bare = workdir.parent / (workdir.name + "_no_t5")
    shutil.copytree(workdir, bare)
    config = json.loads((bare / "config.json").read_text())
    config["text"]["t5_checkpoint"] = ""
    (bare / "config.json").write_text(json.dumps(config))
    out = workdir.parent / (workdir.name + "_samples")
    out.mkdir()
    common = ["--steps", "2", "--seed", "5"]
    results = run_tools([
        ("sample", ["--stages", str(workdir), "--prompt", new, "--prompt", held, "--out", str(out / "config"),
                    *common]),
        ("sample", ["--stages", str(bare), "--prompt", new, "--prompt", "a tiny green square in a corner",
                    "--t5", stored["t5"], "--out", str(out / "flag"), *common]),
        ("sample", ["--stages", str(bare), "--prompt", new, "--out", str(out / "none"), *common])], out)
    for code, _, err in results[:2]:
        assert code == 0, err[-3000:]

    def image(run, name):
        return np.asarray(Image.open(out / run / "images" / name))

    drawn = image("config", "0000_00.png")
    assert drawn.shape == (16, 16, 3) and drawn.std() > 0
    np.testing.assert_array_equal(image("flag", "0000_00.png"), drawn)  # same T5, same noise: same image
    # Image 1 has the same noise in both runs (noise is keyed by image index) but another prompt.
    assert not np.array_equal(image("flag", "0001_00.png"), image("config", "0001_00.png"))
    for run in ("config", "flag"):
        described = json.loads((out / run / "settings.json").read_text())["text_encoder"]
        assert described.endswith(f"prompts not in it encoded by T5 {stored['t5']}"), described
    code, _, err = results[2]
    lines = [ln for ln in err.splitlines() if "error" in ln.lower()]  # orbax logs its restore to stderr too
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("error: prompt") and repr(new) in lines[0], lines
    assert "text.t5_checkpoint" in lines[0] and "--t5" in lines[0], lines
    assert not (out / "none").exists() and not (out / "none.partial").exists()


def tmp_path_factory_root(tmp_path):
    root = tmp_path.parent / (tmp_path.name + "_text")
    root.mkdir()
    return root


def c_size(stage):
    return tiny_config(stage).data.image_size


def test_previews_compile_the_sampler_once(tmp_path, vocab):
    # Each preview used to build a new jitted sampler and compile it again (for the base64 paper
    # U-Net's 256-step loop on one GPU, ~30 s at every train.sample_every).
    c = cfg("base64", vocab, **{"train.num_steps": 4, "train.sample_every": 2, "sampling.steps": 2})
    with count_lowerings("_sample") as lowered:
        train_lib.train(c, str(tmp_path))
    assert lowered["count"] == 1
    assert sorted(os.listdir(tmp_path / "samples")) == ["step_00000002.png", "step_00000004.png"]


def test_device_embeddings_join_the_batch_without_waiting():
    # T5 run on the fly returns embeddings still being computed, sharded like the batch. Copying
    # them through the host (np.asarray, as the loop did) waited for them, and so for the previous
    # train step queued before the encoder: the accelerator idled while the host caught up.
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    sharding = parallel.batch_sharding(mesh, 3)
    slow = jax.jit(lambda x, n: jax.lax.fori_loop(0, n, lambda i, v: v * 0.9999999 + 1e-7, x),
                   out_shardings=sharding)  # a stand-in encoder, ~1 s of work on 2 cores
    x = jax.device_put(np.ones((8, 16, 64), np.float32), sharding)
    slow(x, 10).block_until_ready()  # compiled outside the timing of what follows
    emb = slow(x, 5_000_000)
    rng = np.random.default_rng(0)
    stored = rng.normal(size=(8, 16, 64)).astype(np.float32)  # an embedding store's rows on one device
    host = {"text": emb, "stored": jax.numpy.asarray(stored), "text_mask": np.ones((8, 16), bool),
            "image": rng.uniform(-1, 1, (8, 4, 4, 3)).astype(np.float32)}
    batch = parallel.host_local_batch_to_global(host, mesh)
    assert not emb.is_ready(), "building the batch waited for the embeddings"
    for key, value in batch.items():
        assert value.sharding.is_equivalent_to(parallel.batch_sharding(mesh, value.ndim), value.ndim), key
        np.testing.assert_array_equal(np.asarray(value), np.asarray(host[key]))


def test_loss_falls_on_repeated_batch(vocab):
    """A few optimizer steps on one batch reduce its loss (the gradient path is wired up)."""
    c = cfg("base64", vocab)
    c.diffusion.cond_drop_prob = 0.0
    _, losses = steps_on_one_batch(training.Trainer(c, parallel.make_mesh({"data": -1})), 8, 30)
    assert losses[-1] < 0.7 * losses[0], losses


def steps_on_one_batch(tr, batch_size, steps):
    """`steps` train steps of a tiny base64 Trainer on one fixed batch with one fixed rng (so the
    same noise every step): (final state, losses)."""
    state = tr.init(jax.random.PRNGKey(0))
    batch = {"image": np.tanh(random_batch((batch_size, 16, 16, 3))), "text": random_batch((batch_size, 16, 64), 1),
             "text_mask": np.ones((batch_size, 16), bool)}
    batch = parallel.host_local_batch_to_global(batch, tr.mesh)
    losses = []
    for _ in range(steps):
        state, m = tr.step(state, batch, jax.random.PRNGKey(3))
        losses.append(float(m["loss"]))
    return state, losses


def test_sharding_equivalence(vocab):
    """(data=2, fsdp=2, tensor=2) on 8 devices follows the single-device loss trajectory."""
    c = cfg("sr1024", vocab)
    rng = np.random.default_rng(0)
    batches = [{"image": np.tanh(rng.normal(size=(8, 32, 32, 3))).astype(np.float32),
                "lowres": np.tanh(rng.normal(size=(8, 8, 8, 3))).astype(np.float32),
                "text": rng.normal(size=(8, 16, 64)).astype(np.float32),
                "text_mask": np.arange(16)[None] < rng.integers(1, 16, size=(8, 1))} for _ in range(3)]
    trajectories = []
    for mesh_cfg, devices in [({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
                              ({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())]:
        mesh = parallel.make_mesh(mesh_cfg, devices)
        tr = training.Trainer(c, mesh)
        state = tr.init(jax.random.PRNGKey(0))
        losses = []
        for b in batches:
            state, m = tr.step(state, parallel.host_local_batch_to_global(b, mesh), jax.random.PRNGKey(1))
            losses.append(float(m["loss"]))
        trajectories.append((losses, jax.device_get(state.params)))
    np.testing.assert_allclose(trajectories[0][0], trajectories[1][0], rtol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(trajectories[0][1]), jax.tree_util.tree_leaves(trajectories[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_exact_resume(tmp_path, vocab):
    c = cfg("base64", vocab, **{"train.num_steps": 4})
    train_lib.train(c, str(tmp_path / "straight"))
    train_lib.train(c, str(tmp_path / "resumed"), stop_after=2)
    assert checkpoints.available_steps(str(tmp_path / "resumed")) == [2]
    train_lib.train(c, str(tmp_path / "resumed"))
    for which in ("params", "ema_params"):
        a, sa = params_of(str(tmp_path / "straight"), which)
        b, sb = params_of(str(tmp_path / "resumed"), which)
        assert sa == sb == 4
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(x, y)


def test_sigterm_checkpoints_and_exits(tmp_path, vocab, monkeypatch):
    c = cfg("base64", vocab, **{"train.num_steps": 50, "train.ckpt_every": 100})
    real = pipeline.make_iterator

    def iterator(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 3:  # Cloud TPU preemption arrives while step 4 is being prepared
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(pipeline, "make_iterator", iterator)
    _, state = train_lib.train(c, str(tmp_path))
    assert int(state.step) == 4
    assert checkpoints.available_steps(str(tmp_path)) == [4]
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_nan_halts_without_poisoning_checkpoints(tmp_path, vocab, monkeypatch):
    c = cfg("base64", vocab, **{"train.num_steps": 6, "train.ckpt_every": 2})
    real = pipeline.make_iterator

    def iterator(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 2:
                batch = dict(batch, image=np.full_like(batch["image"], np.nan))
            yield batch

    monkeypatch.setattr(pipeline, "make_iterator", iterator)
    with pytest.raises(train_lib.TrainingError, match="NaN/Inf at step 2"):
        train_lib.train(c, str(tmp_path))
    assert checkpoints.available_steps(str(tmp_path)) == [2]
    params, _ = params_of(str(tmp_path))
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))


def run_cli(args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "imagen_jax.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_unknown_config_key(tmp_path):
    r = run_cli(["--config=configs/base64.py:tiny", f"--workdir={tmp_path}", "--config.train.batchsize=3"])
    assert r.returncode != 0
    assert "batchsize" in r.stderr
    assert r.stderr.count("Traceback") == 0


@pytest.mark.parametrize("override,message", [
    ("--config.mesh.fsdp=3", "does not divide the 8 devices"),
    ("--config.train.batch_size=12", "not divisible by the data-parallel size"),
    ("--config.data.source=tfrecord", "tfrecord"),
])
def test_bad_setup_is_one_clear_error(tmp_path, override, message):
    r = run_cli(["--config=configs/base64.py:tiny", f"--workdir={tmp_path}", override,
                 "--config.data.files=/nonexistent/*.tfrecord"])
    assert r.returncode == 1, r.stderr[-2000:]
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_corrupt_checkpoint_is_reported_and_left_alone(tmp_path, vocab):
    c = cfg("base64", vocab, **{"train.num_steps": 2})
    train_lib.train(c, str(tmp_path))
    step_dir = os.path.join(checkpoints.checkpoint_dir(str(tmp_path)), "2", "params")
    victims = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs if os.path.getsize(os.path.join(d, f)) > 0]
    before = {}
    for v in victims:
        with open(v, "r+b") as f:
            f.write(b"\x00garbage" * 4)
        before[v] = open(v, "rb").read()
    c.train.num_steps = 4
    with pytest.raises(checkpoints.CheckpointError, match="could not be restored"):
        train_lib.train(c, str(tmp_path))
    assert checkpoints.available_steps(str(tmp_path)) == [2]
    assert all(open(v, "rb").read() == before[v] for v in victims)


def test_inspect_prints_parameter_count():
    r = subprocess.run([sys.executable, "-m", "imagen_jax.inspect", "--config=configs/sr1024.py"], cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "params=458151299"  # the paper layout (README "Models")
    per_module = [int(l.split()[-1].replace(",", "")) for l in lines if l.startswith(("down", "up", "conv", "time", "aug", "text", "out"))]
    assert sum(per_module) == 458151299


def test_microbatched_gradients_match_full_batch():
    """accumulate_gradients over 4 slices of a batch sharded on 8 devices gives the full batch's mean
    loss and gradient (a loss that ignores its rng, so both see the same function)."""
    from imagen_jax.training import step as step_lib

    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(5, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    batch = {"x": rng.normal(size=(32, 5)).astype(np.float32), "y": rng.normal(size=(32, 3)).astype(np.float32)}
    shardings = {k: parallel.batch_sharding(mesh, 2) for k in batch}
    batch = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}

    def loss_fn(p, b, _rng):  # a mean of per-example terms: a dropped, repeated or mis-paired example shows
        err = (b["x"] @ p["w"] + p["b"] - b["y"]) ** 2
        return jax.numpy.mean(err * (1.0 + jax.numpy.abs(b["x"][:, :1])))

    full = jax.jit(lambda p, b: jax.value_and_grad(loss_fn)(p, b, None))(params, batch)
    micro = jax.jit(lambda p, b: step_lib.accumulate_gradients(loss_fn, p, b, jax.random.PRNGKey(0), 4,
                                                               shardings))(params, batch)
    np.testing.assert_allclose(micro[0], full[0], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(micro[1]), jax.tree_util.tree_leaves(full[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="microbatches=3"):
        step_lib.accumulate_gradients(loss_fn, params, batch, None, 3)


def test_microbatched_trainer_step(vocab):
    """train.microbatches=2 on an 8-device mesh: the step compiles, keeps the state's shardings and
    learns; a batch that does not split into microbatches per device is one clear error."""
    c = cfg("base64", vocab, **{"train.microbatches": 2})
    c.diffusion.cond_drop_prob = 0.0
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    tr = training.Trainer(c, mesh)
    state, losses = steps_on_one_batch(tr, 16, 20)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(np.isfinite(losses))
    for leaf, want in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(tr.param_shardings)):
        assert leaf.sharding == want
    # The step really runs slices: its program has a loop more than the same step without them.
    loops = [training.lower_train_step(cfg("base64", vocab, **{"train.microbatches": m}), jax.devices(), 16)[1]
             .as_text().count("stablehlo.while") for m in (1, 2)]
    assert loops[1] > loops[0], loops
    with pytest.raises(parallel.MeshError, match="train.microbatches = 2"):
        train_lib.check_batch(cfg("base64", vocab, **{"train.batch_size": 8, "train.microbatches": 2}), mesh)
