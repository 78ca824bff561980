"""Preemption on a multi-host run: two CPU processes train one stage through `imagen_jax.train`
(jax.distributed over localhost). SIGTERM to one of them, then (after a resume) to both: every time
both processes checkpoint the same step (orbax's reached_preemption) and exit 0, and the next run
resumes from that step."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

from imagen_jax import checkpoints
from stage_utils import shapes_vocab
from test_multihost import env, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(workdir, vocab, cache):
    port = free_port()
    args = [sys.executable, "-m", "imagen_jax.train", "--config=configs/base64.py:tiny", f"--workdir={workdir}",
            f"--config.text.vocab={vocab}", "--config.text.max_length=16", "--config.train.num_steps=100000",
            "--config.train.log_every=1", "--config.train.ckpt_every=100000", "--config.train.sample_every=0",
            f"--config.train.compilation_cache={cache}"]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env(1, IMAGEN_JAX_COORDINATOR=f"127.0.0.1:{port}", IMAGEN_JAX_NUM_PROCESSES="2",
                                      IMAGEN_JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [[] for _ in procs]
    for p, out in zip(procs, outs):
        threading.Thread(target=lambda p=p, out=out: out.extend(iter(p.stdout.readline, "")), daemon=True).start()
    return procs, outs


def wait_for(outs, pattern, timeout=400):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(re.search(pattern, ln) for ln in list(outs[0])):
            return
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} within {timeout}s: {''.join(outs[0])[-3000:]}")


def finish(procs, outs):
    for p in procs:
        p.wait(timeout=300)
    time.sleep(0.5)  # the reader threads drain the last lines
    steps = []
    for p, out in zip(procs, outs):
        text = "".join(out)
        assert p.returncode == 0, text[-3000:]
        m = re.findall(r"preempted: checkpoint written at step (\d+)", text)
        assert len(m) == 1, text[-3000:]
        steps.append(int(m[0]))
    assert steps[0] == steps[1], steps
    return steps[0], "".join(outs[0])


def test_sigterm_to_one_then_both_hosts(tmp_path):
    vocab = shapes_vocab(tmp_path)
    wd, cache = str(tmp_path / "wd"), str(tmp_path / "cache")

    procs, outs = start(wd, vocab, cache)
    wait_for(outs, r"^step=2 ")
    procs[1].send_signal(signal.SIGTERM)  # one host preempted
    first, _ = finish(procs, outs)
    assert first >= 2 and checkpoints.available_steps(wd) == [first]

    procs, outs = start(wd, vocab, cache)
    wait_for(outs, rf"^step={first + 1} ")
    for p in procs:  # the whole slice preempted
        p.send_signal(signal.SIGTERM)
    second, text = finish(procs, outs)
    assert f"resumed from step {first} " in text
    assert second > first and checkpoints.available_steps(wd) == [first, second]
