#!/usr/bin/env bash
# Runs on each TPU VM worker (started by `launch/tpu.sh run/stop/supervise`): one imagen_jax tool
# in the background, with its log, pid and exit status under ~/imagen_jax_logs.
#
#   remote_run.sh start TOOL [ARGS...]  start `python -m imagen_jax.TOOL ARGS` under nohup and
#                                       return; output to ~/imagen_jax_logs/TOOL-<hostname>.log
#   remote_run.sh status TOOL           print "running", "exit N" (N = its exit status) or "none"
#   remote_run.sh stop TOOL             stop it (SIGTERM to its process group)
#
# Environment: IMAGEN_JAX_VENV (default ~/imagen_jax_venv); everything else (such as
# IMAGEN_JAX_DISTRIBUTED=1) passes through to the tool.
set -uo pipefail

usage() {
  echo "usage: remote_run.sh start|status|stop TOOL [ARGS...]" >&2
  exit 2
}

(($# >= 2)) || usage
action=$1
tool=$2
shift 2
[[ $tool =~ ^[a-z_][a-z0-9_]*$ ]] || { echo "remote_run.sh: bad tool name '$tool'" >&2; exit 2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOGS="$HOME/imagen_jax_logs"
PIDFILE="$LOGS/$tool.pid"
EXITFILE="$LOGS/$tool.exit"
LOGFILE="$LOGS/$tool-$(hostname).log"

running_pid() {  # prints the pid if the tool is running
  local pid
  [[ -f $PIDFILE ]] || return 1
  pid=$(<"$PIDFILE")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  # An exited process not yet reaped (zombie) still answers kill -0.
  [[ $(ps -o stat= -p "$pid" 2>/dev/null) != Z* ]] || return 1
  echo "$pid"
}

case $action in
  start)
    mkdir -p "$LOGS"
    if pid=$(running_pid); then
      echo "remote_run.sh: $tool is already running on $(hostname) (pid $pid); stop it first" >&2
      exit 1
    fi
    rm -f "$EXITFILE"
    # setsid: its own process group, so that stop ends the tool and its children together;
    # nohup: it outlives the ssh session that started it.
    setsid nohup bash "${BASH_SOURCE[0]}" foreground "$tool" "$@" >>"$LOGFILE" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    echo "$(hostname): started $tool (pid $!), log $LOGFILE"
    ;;
  foreground)
    cd "$REPO" || exit 1
    echo "[$(date -u +%Y-%m-%dT%H:%M:%SZ)] $(hostname): python -m imagen_jax.$tool $*"
    "${IMAGEN_JAX_VENV:-$HOME/imagen_jax_venv}/bin/python" -m "imagen_jax.$tool" "$@"
    rc=$?
    echo "$rc" >"$EXITFILE"
    echo "[$(date -u +%Y-%m-%dT%H:%M:%SZ)] $(hostname): imagen_jax.$tool exited with status $rc"
    exit "$rc"
    ;;
  status)
    if running_pid >/dev/null; then
      echo running
    elif [[ -f $EXITFILE ]]; then
      echo "exit $(<"$EXITFILE")"
    else
      echo none
    fi
    ;;
  stop)
    if pid=$(running_pid); then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
      echo "$(hostname): stopped $tool (pid $pid)"
    else
      echo "$(hostname): $tool is not running"
    fi
    ;;
  *) usage ;;
esac
