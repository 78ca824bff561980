"""Two CPU processes on localhost acting as two hosts give the same losses as one process with two
devices (jax.distributed + per-host data feeding)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices, **extra):
    e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    e.update(extra)
    return e


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def test_two_processes_match_one_process_two_devices(tmp_path):
    # Also: T5 run on the fly hands a training batch its global arrays, the same batch that copying
    # each host's rows through the host gives (the loop's path before, which idled the accelerator).
    from stage_utils import shapes_vocab

    worker = os.path.join(HERE, "multihost_worker.py")
    vocab = shapes_vocab(tmp_path)
    single = subprocess.run([sys.executable, worker, vocab], env=env(2), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ref = last_json(single.stdout)
    assert ref["devices"] == 2
    port = free_port()
    procs = [subprocess.Popen([sys.executable, worker, vocab], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env(1, IMAGEN_JAX_COORDINATOR=f"127.0.0.1:{port}",
                                                 IMAGEN_JAX_NUM_PROCESSES="2", IMAGEN_JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [last_json(out) for out, _ in outs]
    assert sorted(r["process"] for r in results) == [0, 1]
    for r in results:
        assert r["devices"] == 2
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5)
        assert r["t5_global"] and r["t5_same_batch"] and r["t5_text_sum"] > 0
        # The same embeddings as one process with two devices (float32 T5; summation order aside).
        np.testing.assert_allclose(r["t5_text_sum"], ref["t5_text_sum"], rtol=1e-5)


def test_two_hosts_sample_what_one_host_samples(tiny_base, tmp_path):
    """`python -m imagen_jax.sample` on two processes (one device each, jax.distributed over
    localhost), as launch/tpu.sh runs it on a pod: process 0 writes the images, and they equal a
    one-process run on two devices bit for bit, through a base and an SR stage (the SR stage's
    low-res input is a batch-sharded argument too)."""
    from PIL import Image

    from imagen_jax import checkpoints
    from stage_utils import make_workdir

    sr = tmp_path / "sr"
    make_workdir(sr, "sr256", vocab=checkpoints.load_config(tiny_base).text.vocab)
    root = os.path.dirname(HERE)

    def argv(out):
        return [sys.executable, "-m", "imagen_jax.sample", "--stages", f"{tiny_base},{sr}", "--prompt", "a red circle",
                "--prompt", "a large blue square on the left", "--num_images", "2", "--steps", "2,2",
                "--out", str(out)]

    port = free_port()
    procs = [subprocess.Popen(argv(tmp_path / "two"), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env(1, IMAGEN_JAX_COORDINATOR=f"127.0.0.1:{port}",
                                                 IMAGEN_JAX_NUM_PROCESSES="2", IMAGEN_JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    one = subprocess.run(argv(tmp_path / "one"), cwd=root, env=env(2), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    names = sorted(os.listdir(tmp_path / "one" / "images"))
    assert len(names) == 4 and sorted(os.listdir(tmp_path / "two" / "images")) == names
    for name in names:
        a = np.asarray(Image.open(tmp_path / "one" / "images" / name))
        b = np.asarray(Image.open(tmp_path / "two" / "images" / name))
        assert a.shape == (64, 64, 3) and a.std() > 1.0
        np.testing.assert_array_equal(a, b)
