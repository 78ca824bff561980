"""model.remat="auto" picks the cheapest rematerialisation policy that fits a device's memory
(training/remat.py), tested with a fake device memory figure (train.remat_memory_bytes).

XLA's CPU backend assigns the same buffers with and without remat (measured on the tiny base
step: 314,288,272 bytes for none and dots_saveable, 314,321,040 for nothing_saveable at batch 64),
so the choice logic is tested with each candidate's compiled size replaced by a known figure, and
one real compile checks the figure, the chosen Trainer and its precompiled step end to end."""
import jax
import numpy as np
import pytest

from imagen_jax import parallel, training
from imagen_jax.training import loop as train_lib
from imagen_jax.training import remat as remat_lib
from imagen_jax.training import step as step_lib
from tests.stage_utils import count_lowerings, shapes_vocab, tiny_config

BATCH = 4
MiB = 2 ** 20
# Fake compiled sizes: remat saves activation memory, microbatching divides it.
FAKE = {"none": 100 * MiB, "dots_saveable": 70 * MiB, "nothing_saveable": 50 * MiB}


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def auto_config(limit, margin=0.0):
    return tiny_config("base64", **{"model.remat": "auto", "train.remat_memory_bytes": int(limit),
                                    "train.remat_margin": margin, "train.batch_size": BATCH})


@pytest.fixture
def fake_compile(monkeypatch):
    """Candidates 'compile' to their FAKE size (the leanest halves per microbatch doubling)."""
    seen = []

    def compile_step(trainer, batch):
        c = trainer.model_cfg
        name = "none" if not c.remat else c.remat_policy
        seen.append((name, trainer.microbatches))
        return (name, trainer.microbatches)

    def step_bytes(compiled):
        name, micro = compiled
        return FAKE[name] // micro if name == "nothing_saveable" else FAKE[name]

    monkeypatch.setattr(remat_lib, "compile_step", compile_step)
    monkeypatch.setattr(remat_lib, "step_bytes", step_bytes)
    return seen


@pytest.mark.parametrize("limit_mib, chosen, tried", [
    (1000, "none", ["none"]),
    (80, "dots_saveable", ["none", "dots_saveable"]),
    (60, "nothing_saveable", ["none", "dots_saveable", "nothing_saveable"]),
])
def test_cheapest_policy_that_fits(mesh, fake_compile, limit_mib, chosen, tried):
    t = training.Trainer(auto_config(limit_mib * MiB), mesh)
    assert t.remat_report["chosen"] == chosen
    assert [x["policy"] for x in t.remat_report["tried"]] == tried
    # The Trainer became the chosen one: its model has the policy, its step the compiled program.
    assert t.model_cfg.remat == (chosen != "none")
    if chosen != "none":
        assert t.model_cfg.remat_policy == chosen
    assert t.step.compiled == (chosen, 1)


def test_margin_is_kept_free(mesh, fake_compile):
    # 105 MiB with a 10% margin leaves 94.5 MiB: no remat (100 MiB) is refused.
    t = training.Trainer(auto_config(105 * MiB, margin=0.1), mesh)
    assert t.remat_report["chosen"] == "dots_saveable"


def test_nothing_fits_raises_microbatches(mesh, fake_compile):
    t = training.Trainer(auto_config(20 * MiB), mesh)  # 50 MiB / 4 microbatches = 12.5 fits
    assert [(x["policy"], x["microbatches"]) for x in t.remat_report["tried"]] == [
        ("none", 1), ("dots_saveable", 1), ("nothing_saveable", 1), ("nothing_saveable", 2),
        ("nothing_saveable", 4)]
    assert t.microbatches == 4 and t.remat_report["microbatches"] == 4


def test_unfittable_keeps_the_leanest_tried(mesh, fake_compile):
    t = training.Trainer(auto_config(1), mesh)  # batch 4: at most 4 microbatches
    last = dict(t.remat_report["tried"][-1])
    assert last.pop("compile_s") >= 0
    assert last == {"policy": "nothing_saveable", "microbatches": 4, "bytes": FAKE["nothing_saveable"] // 4}
    assert t.microbatches == 4 and t.model_cfg.remat_policy == "nothing_saveable"


def test_real_compile_and_precompiled_step(mesh):
    t = training.Trainer(auto_config(2 ** 40), mesh)
    rep = t.remat_report
    assert rep["chosen"] == "none" and len(rep["tried"]) == 1
    assert isinstance(t.step, training.step._PrecompiledStep)
    assert rep["tried"][0]["bytes"] == remat_lib.step_bytes(t.step.compiled) > 0
    state = t.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    size, text_dim = t.config.data.image_size, t.model_cfg.text_dim
    batch = {"image": rng.uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32),
             "text": rng.normal(size=(BATCH, 16, text_dim)).astype(np.float32),
             "text_mask": np.ones((BATCH, 16), bool)}
    batch = {k: jax.device_put(v, t.batch_shardings[k]) for k, v in batch.items()}
    rng_key = jax.random.PRNGKey(1)
    # The training loop takes the executable the choice compiled, not a second compile of it ...
    exe, seconds, reused = step_lib.executable(t, state, batch, rng_key)
    assert reused and exe is t.step.compiled and seconds == rep["compile_s"] > 0
    # ... but only for the arguments it was compiled for: another batch size or sharding compiles.
    half = {k: jax.device_put(np.asarray(v)[:BATCH // 2], t.batch_shardings[k]) for k, v in batch.items()}
    assert not t.step.accepts(state, half, rng_key)
    other = jax.sharding.SingleDeviceSharding(jax.devices()[1])
    assert not t.step.accepts(state, {k: jax.device_put(v, other) for k, v in batch.items()}, rng_key)
    state, metrics = t.step(state, batch, rng_key)
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))


def test_training_loop_compiles_the_auto_step_once(tmp_path, capsys):
    # Before this was fixed the loop compiled the chosen policy's step a second time: for the base64
    # paper step on one GPU, ~4 more minutes before the first step whenever no persistent
    # compilation cache was configured. 8 devices: the reused executable is sharded over the mesh.
    c = auto_config(2 ** 40)
    c.train.update(num_steps=2, log_every=1, ckpt_every=2, batch_size=8)
    c.text.vocab = shapes_vocab(tmp_path)
    with count_lowerings("_train_step") as lowered:
        metrics, state = train_lib.train(c, str(tmp_path / "workdir"))
    assert lowered["count"] == 1, f"the train step was lowered {lowered['count']} times"
    assert "(while remat=auto chose its policy; not compiled again)" in capsys.readouterr().out
    assert int(state.step) == 2 and np.isfinite(metrics["loss"]) and metrics.get("compile_s") is None


def test_remat_setting_strings():
    assert remat_lib.as_setting("auto") == "auto"
    assert remat_lib.as_setting("False") is False and remat_lib.as_setting("on") is True
    with pytest.raises(ValueError, match="model.remat"):
        remat_lib.as_setting("sometimes")


def test_paper_configs_default_to_auto():
    import importlib
    for stage in ("base64", "sr256", "sr1024"):
        assert importlib.import_module(f"configs.{stage}").get_config("paper").model.remat == "auto"
    from configs import pods
    assert pods.get_config("sr256_v4_128").model.remat is True  # what the pod fit test proves
