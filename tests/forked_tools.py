"""Run many `python -m imagen_jax.<tool> <argv>` cases cheaply (the CLI tests have dozens).

Each case runs in its own process, forked from one that has imported the tools' heavy dependencies
(jax, flax, orbax...) but not the tools themselves: a real `python -m imagen_jax.X` process image
without paying each tool's seconds of imports once per case on a 2-core machine. At most two cases
run at a time (the CI machine has two cores)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_RUNNER = r"""
import json, os, runpy, sys
import jax, flax.linen, optax, orbax.checkpoint, ml_collections  # noqa: F401
import imagen_jax.cascade, imagen_jax.sampling, imagen_jax.bundle, imagen_jax.training  # noqa: F401
jobs, running, codes = json.load(sys.stdin), {}, {}
def reap():
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
for i, (tool, argv, out, err) in enumerate(jobs):
    if len(running) >= 2:
        reap()
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT), 1)
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT), 2)
        sys.argv = [f"imagen_jax/{tool}.py", *argv]
        code = 0
        try:
            runpy.run_module(f"imagen_jax.{tool}", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 99  # an uncaught exception: what the tests must never see
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    running[pid] = i
while running:
    reap()
print(json.dumps([codes[i] for i in range(len(jobs))]))
"""


def run_tools(jobs, tmp):
    """[(exit code, stdout, stderr)] for each (tool, argv) in jobs; files go under tmp (a Path)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device is enough for every case
    spec = [(tool, list(argv), str(tmp / f"{i}.out"), str(tmp / f"{i}.err")) for i, (tool, argv) in enumerate(jobs)]
    r = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(spec), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    codes = json.loads(r.stdout.strip().splitlines()[-1])
    return [(c, open(s[2]).read(), open(s[3]).read()) for c, s in zip(codes, spec)]
