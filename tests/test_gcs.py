"""Every tool on gs:// paths against a local GCS API (tests/gcs_emulator.py: gcp-storage-emulator on
127.0.0.1): train a tiny stage -> SIGTERM -> resume from the saved step -> sample from the gs://
workdir -> export a bundle to gs:// -> sample from the bundle -> encode_text to gs://; the command
`launch/tpu.sh run --dry_run` prints, run locally; bad buckets, credentials and workdirs. Nothing
may land in a local directory named `gs:`."""
import json
import os
import shlex
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from imagen_jax import bundle, checkpoints, paths, sampling
from imagen_jax.data import pipeline
from imagen_jax.training import loop as train_lib
from stage_utils import tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUCKET = "imagen-test"
WD = f"gs://{BUCKET}/base64"
CACHE = f"gs://{BUCKET}/jax_cache"
# The run's overrides, shared by the in-process run and the launched command (the same program, so
# the launched run finds its compiled step in the gs:// compilation cache).
OVERRIDES = {"train.num_steps": 3, "train.log_every": 1, "train.ckpt_every": 100, "train.batch_size": 8,
             "train.compilation_cache": CACHE, "sampling.steps": 2}


_EMULATORS = []


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
    """The emulator's address; the clients' environment points at it while the module runs."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "gcs_emulator.py"), str(port), BUCKET],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        url = f"http://127.0.0.1:{port}"
        env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
               "NO_GCE_CHECK": "true"}  # no metadata-server probe on a machine outside GCP
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield env
    finally:
        for k, v in locals().get("old", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        # Not stopped here: tensorboardX's gs:// writers upload again when collected at interpreter
        # exit (each retrying for two minutes if the server is gone); it exits when this process does
        # (its stdin, held open here, closes).
        _EMULATORS.append(proc)


@pytest.fixture(scope="module", autouse=True)
def restore_compilation_cache():
    """The in-process training run turns on jax's persistent compilation cache at a gs:// path (a
    process-wide setting); later test modules must not compile through it once the emulator's
    environment is gone (every compile would then wait on unreachable GCS)."""
    import jax
    from jax._src import compilation_cache

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
    """Tests run from an empty directory, so a path mistaken for a local one shows up as ./gs:."""
    d = tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(d)
    yield d
    os.chdir(old)


def no_local_gs(cwd):
    assert not os.path.exists(os.path.join(cwd, "gs:")), os.listdir(os.path.join(cwd, "gs:"))
    assert not os.path.exists(os.path.join(ROOT, "gs:"))


def config():
    c = tiny_config("base64", **OVERRIDES)
    return c


def test_train_sigterm_resume_sample_export_encode(gcs, cwd, capsys, monkeypatch):
    # ---- train; SIGTERM while step 2 is being prepared: step 2 is checkpointed and the run returns
    real = pipeline.make_iterator

    def iterator(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(pipeline, "make_iterator", iterator)
    try:
        _, state = train_lib.train(config(), WD)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    monkeypatch.setattr(pipeline, "make_iterator", real)
    assert int(state.step) == 2
    assert checkpoints.available_steps(WD) == [2]
    assert "preempted: checkpoint written at step 2" in capsys.readouterr().out
    for name in ("config.json", "metrics.jsonl", "vocab/shapes_spm.model"):
        assert paths.isfile(f"{WD}/{name}"), name
    assert any(n.startswith("events") for n in paths.listdir(f"{WD}/tensorboard"))
    assert paths.listdir(CACHE), "the compilation cache on gs:// is empty"

    # ---- resume: continues from step 2 (orbax's latest_step), not from 0
    _, state = train_lib.train(config(), WD)
    out = capsys.readouterr().out
    assert f"resumed from step 2 ({WD}/checkpoints)" in out
    assert int(state.step) == 3 and checkpoints.available_steps(WD) == [2, 3]
    steps = [json.loads(ln)["step"] for ln in paths.read_text(f"{WD}/metrics.jsonl").splitlines()]
    assert steps == [1, 2, 3]

    # ---- sample from the gs:// workdir
    prompts = ["a red circle", "a blue square"]
    imgs = sampling.generate([WD], prompts, f"gs://{BUCKET}/samples", steps="2", log=lambda *a: None)
    record = json.loads(paths.read_text(f"gs://{BUCKET}/samples/settings.json"))
    assert record["stages"][0]["source"] == WD and record["stages"][0]["step"] == 3
    assert paths.listdir(f"gs://{BUCKET}/samples/images") == ["0000_00.png", "0001_00.png"]

    # ---- export a bundle to gs:// and sample from it
    info = bundle.export(WD, f"gs://{BUCKET}/bundle", progress=False, log=None, dtype="float32")
    assert info["step"] == 3 and info["source_workdir"] == WD
    assert paths.isfile(f"gs://{BUCKET}/bundle/info.json")
    from_bundle = sampling.generate([f"gs://{BUCKET}/bundle"], prompts, f"gs://{BUCKET}/samples_bundle",
                                    steps="2", log=lambda *a: None)
    # float32 bundle of the same EMA parameters: the same images
    np.testing.assert_array_equal(from_bundle, imgs)

    # ---- encode_text: T5X checkpoint and vocabulary on gs://, store written to gs://
    from imagen_jax import encode_text
    from imagen_jax.text import store as store_lib

    t5 = f"gs://{BUCKET}/t5/checkpoint_0/checkpoint"
    with open(os.path.join(ROOT, "..", "shared", "fixtures", "t5x", "test_t5_tiny.checkpoint_0"), "rb") as f:
        paths.write_bytes(t5, f.read())
    paths.write_text(f"gs://{BUCKET}/captions.txt", "\n".join(prompts) + "\n")
    rc = encode_text.main(["--t5", t5, "--vocab", f"{WD}/vocab/shapes_spm.model", "--captions_file",
                           f"gs://{BUCKET}/captions.txt", "--out", f"gs://{BUCKET}/emb", "--max_length", "16"])
    assert rc == 0
    store = store_lib.EmbeddingStore(f"gs://{BUCKET}/emb")
    emb, mask = store.lookup(prompts)
    assert emb.shape == (2, 16, 8) and mask.any(axis=1).all()
    no_local_gs(cwd)


def _tool(args, env, timeout=300):
    """`python -m args` with os.environ changed by env (None: unset)."""
    full = dict(os.environ, JAX_PLATFORMS="cpu")
    for k, v in env.items():
        full.pop(k, None) if v is None else full.__setitem__(k, v)
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def _listing(bucket):
    import gcsfs
    return sorted(gcsfs.GCSFileSystem(skip_instance_cache=True).find(bucket))


def test_launch_dry_run_command_runs_against_the_emulator(gcs, cwd, tmp_path):
    """The command `launch/tpu.sh run --dry_run` prints for a gs:// workdir, run here as one host."""
    wd = f"gs://{BUCKET}/launched"
    overrides = [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + ["--config.text.max_length=16",
                                                                      "--config.train.sample_every=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "PROJECT", "WORKDIR", "DRY_RUN")}
    printed = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu.sh"), "run", "--dry_run", "--name", "t",
                              "--zone", "us-central2-b", "--project", "p", "--accelerator", "v4-8", "--workdir", wd,
                              "--", "train", "--config=configs/base64.py:tiny", *overrides, "--stop_after=1"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert printed.returncode == 0, printed.stderr
    [line] = [ln for ln in printed.stdout.splitlines() if ln and not ln.startswith("#")]
    argv = shlex.split(line)
    remote = shlex.split([a.split("=", 1)[1] for a in argv if a.startswith("--command=")][0])
    assert remote[:3] == ["cd", "imagen_jax", "&&"] and f"--workdir={wd}" in remote
    # On the pod each worker runs this through remote_run.sh; here: one host, in the foreground.
    tool_args = remote[remote.index("start") + 1:]
    assert tool_args[0] == "train"
    cmd = ["bash", os.path.join(ROOT, "launch", "remote_run.sh"), "foreground", *tool_args]
    run_env = dict(os.environ, JAX_PLATFORMS="cpu", IMAGEN_JAX_VENV=os.path.dirname(os.path.dirname(sys.executable)),
                   HOME=str(tmp_path))
    r = subprocess.run(cmd, cwd=str(cwd), env=run_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert checkpoints.available_steps(wd) == [1]
    assert paths.isfile(f"{wd}/config.json")
    no_local_gs(cwd)


@pytest.mark.parametrize("case", ["no_bucket", "no_credentials", "other_stage"])
def test_bad_input_is_one_line_and_writes_nothing(gcs, cwd, case):
    if case == "other_stage":  # a base64 workdir, asked to train an SR stage
        other = f"gs://{BUCKET}/other"
        checkpoints.save_config(other, config())
        args, env = ["imagen_jax.train", "--config=configs/sr256.py:tiny", f"--workdir={other}"], {}
        want = f"workdir {other} holds another run: stage 'base64' (asked: 'sr256')"
    elif case == "no_bucket":
        args, env = ["imagen_jax.train", "--config=configs/base64.py:tiny", "--workdir=gs://no-such-bucket/run"], {}
        want = "bucket gs://no-such-bucket does not exist"
    else:  # outside the emulator, on a machine without Google credentials
        args = ["imagen_jax.sample", "--prompt=a cat", f"--stages={WD}", f"--out=gs://{BUCKET}/nocred"]
        env = {"STORAGE_EMULATOR_HOST": None, "GOOGLE_APPLICATION_CREDENTIALS": None,
               "CLOUDSDK_CONFIG": str(cwd / "no_gcloud")}
        want = "no Google Cloud credentials"
    before = _listing(BUCKET)
    r = _tool(args, env)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and want in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert _listing(BUCKET) == before
    no_local_gs(cwd)
