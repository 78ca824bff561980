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


def test_two_processes_match_one_process_two_devices():
    worker = os.path.join(HERE, "multihost_worker.py")
    single = subprocess.run([sys.executable, worker], env=env(2), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ref = last_json(single.stdout)
    assert ref["devices"] == 2
    port = free_port()
    procs = [subprocess.Popen([sys.executable, worker], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(1, IMAGEN_JAX_COORDINATOR=f"127.0.0.1:{port}", IMAGEN_JAX_NUM_PROCESSES="2",
                                      IMAGEN_JAX_PROCESS_ID=str(i))) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [last_json(out) for out, _ in outs]
    assert sorted(r["process"] for r in results) == [0, 1]
    for r in results:
        assert r["devices"] == 2
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5)
