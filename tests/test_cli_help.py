"""One CLI convention: every entry point's --help exits 0 and names every flag the tool defines;
a bad integer value and a missing required flag exit 2 with one line, no traceback, no absl dump."""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forked_tools import run_tools  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("train", "sample", "export", "evaluate_fid", "encode_text", "inspect", "demo")

# The flags a tool defines, read from its source (absl DEFINE_*, config flags).
DEFINE = re.compile(r"""(?:flags\.DEFINE_\w+|cli\.define_config)\(\s*["'](\w+)["']""")
INTEGER = re.compile(r"""flags\.DEFINE_integer\(\s*["'](\w+)["']""")

def tool_flags(tool):
    with open(os.path.join(ROOT, "imagen_jax", f"{tool}.py")) as f:
        src = f.read()
    assert "argparse" not in src, f"{tool} parses its flags with argparse; every tool uses absl flags"
    names = set(DEFINE.findall(src))
    ints = INTEGER.findall(src)
    return names, ints


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
