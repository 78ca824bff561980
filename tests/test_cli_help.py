"""One CLI convention: every entry point's --help exits 0 and names every flag the tool defines;
a bad integer value and a missing required flag exit 2 with one line, no traceback, no absl dump."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("train", "sample", "export", "evaluate_fid", "encode_text", "inspect", "demo")

# The flags a tool defines, read from its source (absl DEFINE_*, config flags).
DEFINE = re.compile(r"""(?:flags\.DEFINE_\w+|cli\.define_config)\(\s*["'](\w+)["']""")
INTEGER = re.compile(r"""flags\.DEFINE_integer\(\s*["'](\w+)["']""")

# Each case in its own forked process, from one that imported the heavy dependencies once; up to
# two at a time (the CI machine has two cores).
RUNNER = r"""
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
            code = 99
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    running[pid] = i
while running:
    reap()
print(json.dumps([codes[i] for i in range(len(jobs))]))
"""


def tool_flags(tool):
    with open(os.path.join(ROOT, "imagen_jax", f"{tool}.py")) as f:
        src = f.read()
    assert "argparse" not in src, f"{tool} parses its flags with argparse; every tool uses absl flags"
    names = set(DEFINE.findall(src))
    ints = INTEGER.findall(src)
    return names, ints


def run_tools(jobs, tmp):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    spec = [(tool, argv, str(tmp / f"{i}.out"), str(tmp / f"{i}.err")) for i, (tool, argv) in enumerate(jobs)]
    r = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(spec), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    codes = json.loads(r.stdout.strip().splitlines()[-1])
    return [(c, open(s[2]).read(), open(s[3]).read()) for c, s in zip(codes, spec)]


def test_help_and_bad_flags(tmp_path):
    jobs, checks = [], []
    for tool in TOOLS:
        names, ints = tool_flags(tool)
        assert names and ints, f"{tool}: no flags found in its source"
        jobs.append((tool, ["--help"]))
        checks.append(("help", tool, names))
        jobs.append((tool, [f"--{ints[0]}=notanumber"]))
        checks.append(("bad", tool, [f"--{ints[0]}", "notanumber"]))
        if tool != "demo":  # the demo has a default for everything: without flags it runs
            jobs.append((tool, []))
            checks.append(("missing", tool, []))
    failures = []
    for (kind, tool, want), (code, out, err) in zip(checks, run_tools(jobs, tmp_path)):
        what = f"{tool} {kind}: rc={code}\nstdout: {out[-1500:]}\nstderr: {err[-1500:]}"
        if kind == "help":
            missing = sorted(n for n in want if not re.search(rf"--(\[no\])?{n}\b", out))
            if tool == "sample" and "per device batch" in out:  # --batch_size is global
                missing.append("sample --batch_size says 'per device'")
            if code != 0 or missing or "Traceback" in err:
                failures.append(f"{what}\nflags missing from --help: {missing}")
            continue
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if code != 2 or "Traceback" in err or "FATAL" in err or len(lines) != 1 or \
                not all(w in lines[0] for w in want):
            failures.append(what)
    assert not failures, "\n\n".join(failures)
