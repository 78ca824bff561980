#!/usr/bin/env bash
# Cloud TPU VM launcher for imagen_jax: create a slice, copy the repository to every worker,
# start a tool on all workers at once, follow its log, and bring it back after preemption.
# Run `launch/tpu.sh help` for the commands and settings; `--dry_run` prints the commands.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="imagen_jax"            # on each worker, relative to $HOME
REMOTE_LOGS="imagen_jax_logs"      # per-worker logs: <tool>-<hostname>.log (launch/remote_run.sh)

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh COMMAND [FLAGS] [-- TOOL ARGS...]

Commands
  create      create the TPU VM slice (--queued: as a queued resource; --spot / --preemptible)
  setup       copy this repository to every worker, make a venv, install jax[tpu] + requirements.txt
  run         start `python -m imagen_jax.TOOL ARGS` on all workers (IMAGEN_JAX_DISTRIBUTED=1),
              logs in ~/imagen_jax_logs/TOOL-<hostname>.log; e.g. run -- train --config=...
              --restart_on_preempt: keep watching and relaunch after preemption (= supervise)
  supervise   run, then poll the TPU state; on PREEMPTED/TERMINATED (queued: SUSPENDED/FAILED)
              delete, recreate, set up and run again (the trainer resumes from --workdir)
  logs        follow worker 0's log of TOOL (--tool, default train; --lines, default 100)
  ssh         ssh into one worker (--worker, default 0); `ssh -- CMD` runs CMD there
  status      print the TPU state (READY, PREEMPTED, ...; queued: ACTIVE, SUSPENDED, ...)
  stop        stop TOOL on all workers
  delete      delete the slice (with --queued: the queued resource and its node)
  help        this text

Settings (flag, or environment variable)
  --name NAME            TPU_NAME          TPU node name (required)
  --zone ZONE            ZONE              e.g. us-central2-b (required)
  --project PROJECT      PROJECT           default: gcloud's configured project
  --accelerator TYPE     ACCELERATOR_TYPE  v4-8, v4-256, v5litepod-16, v5p-128, v6e-64, ...
                                           (v4/v5p count TensorCores, v5litepod/v6e chips)
  --runtime VERSION      RUNTIME_VERSION   default by generation: v4 tpu-ubuntu2204-base,
                                           v5p v2-alpha-tpuv5, v5litepod v2-alpha-tpuv5-lite,
                                           v6e v2-alpha-tpuv6e
  --queued               QUEUED=1          use a queued resource (named --queued_resource,
  --queued_resource ID   QUEUED_RESOURCE   default NAME-qr)
  --spot                 SPOT=1            Spot VMs (cheap, preemptible at any time)
  --preemptible          PREEMPTIBLE=1     preemptible VMs (not with --queued)
  --workdir gs://...     WORKDIR           passed to the tool as --workdir; must be on gs://
  --git URL [--ref REF]  GIT_URL, GIT_REF  setup clones URL instead of copying this checkout
  --jax_version X.Y.Z    JAX_VERSION       pin jax[tpu] in setup (default: newest allowed)
  --tool TOOL            TOOL              for logs/stop (default train)
  --worker N             WORKER            for ssh/logs (default 0)
  --lines N                                for logs (default 100)
  --poll SECONDS         POLL_SECONDS      supervise: seconds between state checks (default 60)
  --max_restarts N       MAX_RESTARTS      supervise: recreations before giving up (default 20)
  --dry_run              DRY_RUN=1         print the commands, one per line, and run nothing

Examples
  launch/tpu.sh create --name imagen --zone us-central2-b --accelerator v4-256 --queued --spot
  launch/tpu.sh setup  --name imagen --zone us-central2-b --queued
  launch/tpu.sh run    --name imagen --zone us-central2-b --workdir gs://bucket/imagen64 \
      --restart_on_preempt --queued --spot --accelerator v4-256 -- train --config=configs/base64.py
  launch/tpu.sh logs   --name imagen --zone us-central2-b
EOF
}

die() {  # usage error: one line, exit 2
  echo "tpu.sh: error: $*" >&2
  exit 2
}

note() {  # progress, to stderr so that --dry_run's stdout holds only commands
  echo "tpu.sh: $*" >&2
}

# ---------------------------------------------------------------- settings
NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR="${ACCELERATOR_TYPE:-}"
RUNTIME="${RUNTIME_VERSION:-}"
QUEUED="${QUEUED:-0}"
QR_NAME="${QUEUED_RESOURCE:-}"
SPOT="${SPOT:-0}"
PREEMPTIBLE="${PREEMPTIBLE:-0}"
WORKDIR="${WORKDIR:-}"
GIT_URL="${GIT_URL:-}"
GIT_REF="${GIT_REF:-}"
JAX_VERSION="${JAX_VERSION:-}"
TOOL="${TOOL:-train}"
WORKER="${WORKER:-0}"
LINES_N=100
POLL="${POLL_SECONDS:-60}"
MAX_RESTARTS="${MAX_RESTARTS:-20}"
DRY_RUN="${DRY_RUN:-0}"
RESTART=0
COMMAND=""
REST=()       # what follows `--`
HAVE_REST=0

parse_args() {
  local arg key val
  while (($#)); do
    arg=$1
    shift
    if [[ $arg == "--" ]]; then
      HAVE_REST=1
      REST=("$@")
      return
    fi
    if [[ $arg == -h || $arg == --help ]]; then
      COMMAND=help
      continue
    fi
    if [[ $arg != --* ]]; then
      [[ -z $COMMAND ]] || die "unexpected argument '$arg' (tool arguments go after '--')"
      COMMAND=$arg
      continue
    fi
    key=${arg#--}
    val=""
    local has_val=0
    if [[ $key == *=* ]]; then
      val=${key#*=}
      key=${key%%=*}
      has_val=1
    fi
    key=${key//-/_}
    case $key in
      dry_run | queued | spot | preemptible | restart_on_preempt)
        ((has_val == 0)) || die "--$key takes no value"
        case $key in
          dry_run) DRY_RUN=1 ;;
          queued) QUEUED=1 ;;
          spot) SPOT=1 ;;
          preemptible) PREEMPTIBLE=1 ;;
          restart_on_preempt) RESTART=1 ;;
        esac
        ;;
      name | zone | project | accelerator | accelerator_type | runtime | runtime_version | \
        queued_resource | workdir | git | ref | jax_version | tool | worker | lines | poll | \
        max_restarts)
        if ((has_val == 0)); then
          if (($# == 0)) || [[ $1 == --* ]]; then die "--$key needs a value"; fi
          val=$1
          shift
        fi
        case $key in
          name) NAME=$val ;;
          zone) ZONE=$val ;;
          project) PROJECT=$val ;;
          accelerator | accelerator_type) ACCELERATOR=$val ;;
          runtime | runtime_version) RUNTIME=$val ;;
          queued_resource) QR_NAME=$val ;;
          workdir) WORKDIR=$val ;;
          git) GIT_URL=$val ;;
          ref) GIT_REF=$val ;;
          jax_version) JAX_VERSION=$val ;;
          tool) TOOL=$val ;;
          worker) WORKER=$val ;;
          lines) LINES_N=$val ;;
          poll) POLL=$val ;;
          max_restarts) MAX_RESTARTS=$val ;;
        esac
        ;;
      *) die "unknown flag '$arg' (see launch/tpu.sh help)" ;;
    esac
  done
}

# ---------------------------------------------------------------- checks and defaults
require_target() {
  [[ -n $NAME ]] || die "no TPU name: set TPU_NAME or pass --name"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "TPU name '$NAME' must be lower-case letters, digits and '-', starting with a letter"
  [[ -n $ZONE ]] || die "no zone: set ZONE or pass --zone (e.g. us-central2-b)"
  [[ -n $QR_NAME ]] || QR_NAME="$NAME-qr"
  [[ $QUEUED == 0 || $QUEUED == 1 ]] || die "QUEUED must be 0 or 1, got '$QUEUED'"
}

require_accelerator() {
  [[ -n $ACCELERATOR ]] ||
    die "no accelerator type: set ACCELERATOR_TYPE or pass --accelerator (e.g. v4-8, v5litepod-16)"
  if [[ $ACCELERATOR =~ ^v5e-([0-9]+)$ ]]; then
    die "accelerator '$ACCELERATOR': Cloud TPU calls v5e 'v5litepod', use v5litepod-${BASH_REMATCH[1]}"
  fi
  [[ $ACCELERATOR =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-[0-9]+$ ]] ||
    die "unknown accelerator type '$ACCELERATOR' (expected e.g. v4-8, v4-256, v5litepod-16, v5p-128, v6e-64)"
  if [[ -z $RUNTIME ]]; then
    case $ACCELERATOR in
      v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
      v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
      v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
      *) RUNTIME=tpu-ubuntu2204-base ;;
    esac
  fi
  if [[ $SPOT == 1 && $PREEMPTIBLE == 1 ]]; then
    die "--spot and --preemptible exclude each other"
  fi
  if [[ $QUEUED == 1 && $PREEMPTIBLE == 1 ]]; then
    die "queued resources take --spot, not --preemptible"
  fi
}

require_tool() {  # the tool and its arguments, from after `--`
  ((HAVE_REST && ${#REST[@]} > 0)) ||
    die "$COMMAND needs the tool after '--', e.g. launch/tpu.sh $COMMAND -- train --config=configs/base64.py"
  TOOL=${REST[0]}
  [[ $TOOL =~ ^[a-z_][a-z0-9_]*$ ]] ||
    die "tool '$TOOL' is not a module name under imagen_jax (e.g. train, sample, evaluate_fid)"
  if [[ -n $WORKDIR && $WORKDIR != gs://* ]]; then
    die "workdir '$WORKDIR' must be a gs:// path that every worker can reach"
  fi
}

check_tool_name() {
  [[ $TOOL =~ ^[a-z_][a-z0-9_]*$ ]] || die "tool '$TOOL' is not a module name under imagen_jax"
}

check_int() {  # name value
  [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a whole number, got '$2'"
}

# ---------------------------------------------------------------- command helpers
quote() {  # one word, shell-quoted only when it needs to be (like Python's shlex.quote)
  local s=$1
  if [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9_-]+=)(.*)$ ]]; then  # --flag='value', easier to read
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(quote "$a")"
  done
  printf '%s' "$out"
}

do_cmd() {  # run a command, or with --dry_run print it
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(quote_all "$@")"
  else
    note "$(quote_all "$@")"
    "$@"
  fi
}

comment() {  # a '#' line in --dry_run output, to mark phases
  if [[ $DRY_RUN == 1 ]]; then printf '# %s\n' "$*"; else note "$*"; fi
}

where() {  # gcloud location flags
  WHERE=("--zone=$ZONE")
  [[ -z $PROJECT ]] || WHERE+=("--project=$PROJECT")
}

tpu_ssh() {  # worker remote-command
  where
  do_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" "--worker=$1" "--command=$2"
}

# ---------------------------------------------------------------- commands
cmd_create() {
  where
  if [[ $QUEUED == 1 ]]; then
    local args=(gcloud compute tpus queued-resources create "$QR_NAME" "${WHERE[@]}"
      "--node-id=$NAME" "--accelerator-type=$ACCELERATOR" "--runtime-version=$RUNTIME")
    [[ $SPOT == 0 ]] || args+=(--spot)
    do_cmd "${args[@]}"
  else
    local args=(gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}"
      "--accelerator-type=$ACCELERATOR" "--version=$RUNTIME")
    [[ $SPOT == 0 ]] || args+=(--spot)
    [[ $PREEMPTIBLE == 0 ]] || args+=(--preemptible)
    do_cmd "${args[@]}"
  fi
}

cmd_setup() {
  where
  local install="bash $REMOTE_DIR/launch/remote_setup.sh"
  [[ -z $JAX_VERSION ]] || install="JAX_VERSION=$(quote "$JAX_VERSION") $install"
  if [[ -n $GIT_URL ]]; then
    local clone="git clone --depth=1"
    [[ -z $GIT_REF ]] || clone+=" --branch=$(quote "$GIT_REF")"
    tpu_ssh all "rm -rf $REMOTE_DIR && $clone $(quote "$GIT_URL") $REMOTE_DIR && $install"
  else
    local tarball="${TMPDIR:-/tmp}/imagen_jax-$NAME.tgz"
    do_cmd tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude='./workdir*' --exclude=./demo_out --exclude=./.whl \
      -C "$ROOT" .
    do_cmd gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$REMOTE_DIR.tgz" "${WHERE[@]}" \
      --worker=all
    tpu_ssh all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_DIR.tgz -C $REMOTE_DIR && $install"
  fi
}

cmd_run() {
  # ${x[@]+"${x[@]}"}: an empty array under `set -u` on bash 3.2 (macOS) too.
  local args=() a has_workdir=0
  ((${#REST[@]} < 2)) || args=("${REST[@]:1}")
  for a in ${args[@]+"${args[@]}"}; do
    if [[ $a == --workdir=* || $a == --workdir ]]; then
      has_workdir=1
      [[ $a != --workdir=* || $a == --workdir=gs://* ]] ||
        note "warning: $a is not on gs://; workers of a multi-host slice will not share it"
    fi
  done
  if [[ -n $WORKDIR ]]; then
    ((has_workdir == 0)) || die "workdir given twice: --workdir $WORKDIR and in the tool arguments"
    args=("--workdir=$WORKDIR" ${args[@]+"${args[@]}"})
  fi
  # remote_run.sh starts the tool under nohup and returns at once; output goes to
  # ~/imagen_jax_logs/TOOL-<hostname>.log on each worker.
  local remote="cd $REMOTE_DIR && IMAGEN_JAX_DISTRIBUTED=1 bash launch/remote_run.sh start $TOOL"
  ((${#args[@]} == 0)) || remote+=" $(quote_all ${args[@]+"${args[@]}"})"
  tpu_ssh all "$remote"
}

cmd_logs() {
  check_tool_name
  check_int --lines "$LINES_N"
  check_int --worker "$WORKER"
  # $(hostname) is expanded on the worker.
  # shellcheck disable=SC2016
  tpu_ssh "$WORKER" "tail -n $LINES_N -F $REMOTE_LOGS/$TOOL-\$(hostname).log"
}

cmd_ssh() {
  [[ $WORKER =~ ^[0-9]+$|^all$ ]] || die "--worker must be a worker number or 'all', got '$WORKER'"
  where
  if ((HAVE_REST && ${#REST[@]} > 0)); then
    do_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" "--worker=$WORKER" \
      "--command=${REST[*]}"
  else
    do_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" "--worker=$WORKER"
  fi
}

cmd_stop() {
  check_tool_name
  tpu_ssh all "bash $REMOTE_DIR/launch/remote_run.sh stop $TOOL"
}

describe_cmd() {  # the command that prints the state: node, or queued resource
  where
  if [[ $QUEUED == 1 ]]; then
    DESCRIBE=(gcloud compute tpus queued-resources describe "$QR_NAME" "${WHERE[@]}"
      "--format=value(state.state)")
  else
    DESCRIBE=(gcloud compute tpus tpu-vm describe "$NAME" "${WHERE[@]}" "--format=value(state)")
  fi
}

cmd_status() {
  describe_cmd
  do_cmd "${DESCRIBE[@]}"
}

cmd_delete() {
  where
  if [[ $QUEUED == 1 ]]; then
    do_cmd gcloud compute tpus queued-resources delete "$QR_NAME" "${WHERE[@]}" --force --quiet
  else
    do_cmd gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
  fi
}

# ---------------------------------------------------------------- preemption supervisor
current_state() {  # prints READY / PREEMPTED / ACTIVE / SUSPENDED / ..., MISSING or UNKNOWN
  describe_cmd
  local state errfile
  errfile=$(mktemp)
  if state=$("${DESCRIBE[@]}" 2>"$errfile"); then
    state=$(printf '%s\n' "$state" | tail -n 1)
  elif grep -qi "not.found" "$errfile"; then
    state=MISSING
  else
    state=UNKNOWN  # gcloud or the network failed: no reason to recreate a slice
  fi
  rm -f "$errfile"
  echo "${state:-UNKNOWN}"
}

job_state() {  # worker 0's view of the tool: running / exit N / none / unknown
  where
  gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=0 \
    "--command=bash $REMOTE_DIR/launch/remote_run.sh status $TOOL" 2>/dev/null | tail -n 1 ||
    echo unknown
}

lost() {  # is this state a lost slice?
  case $1 in
    PREEMPTED | TERMINATED | SUSPENDING | SUSPENDED | FAILED | MISSING) return 0 ;;
    *) return 1 ;;
  esac
}

wait_ready() {
  describe_cmd
  if [[ $DRY_RUN == 1 ]]; then
    comment "repeat every ${POLL}s until it prints $([[ $QUEUED == 1 ]] && echo ACTIVE || echo READY):"
    do_cmd "${DESCRIBE[@]}"
    return
  fi
  local state
  while true; do
    state=$(current_state)
    case $state in
      READY | ACTIVE) return 0 ;;
      FAILED | MISSING | PREEMPTED | TERMINATED | SUSPENDED)
        note "$NAME did not come up: state $state"
        return 1
        ;;
    esac
    note "waiting for $NAME: state $state"
    sleep "$POLL"
  done
}

recover() {  # each step checked here: errexit does not apply inside `recover || ...`
  comment "recreate after preemption: delete, create, wait, setup, run"
  cmd_delete || note "delete failed (already gone?); creating anyway"
  cmd_create || return 1
  wait_ready || return 1
  cmd_setup || return 1
  cmd_run || return 1
}

cmd_supervise() {
  check_int --poll "$POLL"
  check_int --max_restarts "$MAX_RESTARTS"
  cmd_run
  if [[ $DRY_RUN == 1 ]]; then
    describe_cmd
    comment "then every ${POLL}s: the TPU state, and whether $TOOL has finished on worker 0:"
    do_cmd "${DESCRIBE[@]}"
    tpu_ssh 0 "bash $REMOTE_DIR/launch/remote_run.sh status $TOOL"
    comment "on PREEMPTED, TERMINATED, SUSPENDED, FAILED or a missing TPU (at most $MAX_RESTARTS times):"
    recover
    return
  fi
  local restarts=0 state job
  while true; do
    sleep "$POLL"
    state=$(current_state)
    if lost "$state"; then
      ((restarts < MAX_RESTARTS)) || { note "gave up after $restarts recreations"; return 1; }
      restarts=$((restarts + 1))
      note "$NAME is $state: recreating ($restarts of at most $MAX_RESTARTS)"
      recover || note "recovery attempt failed; will retry"
      continue
    fi
    [[ $state == READY || $state == ACTIVE ]] || continue
    job=$(job_state)
    case $job in
      "exit 0")
        note "$TOOL finished on worker 0"
        return 0
        ;;
      exit*)
        # A worker that dies with its slice also ends the tool: look again before giving up.
        sleep "$POLL"
        state=$(current_state)
        if lost "$state"; then continue; fi
        note "$TOOL failed on worker 0 ($job); see: launch/tpu.sh logs --name $NAME --zone $ZONE"
        return 1
        ;;
    esac
  done
}

# ---------------------------------------------------------------- main
main() {
  parse_args "$@"
  [[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || die "DRY_RUN must be 0 or 1, got '$DRY_RUN'"
  for v in SPOT PREEMPTIBLE; do
    [[ ${!v} == 0 || ${!v} == 1 ]] || die "$v must be 0 or 1, got '${!v}'"
  done
  case $COMMAND in
    "" ) die "no command; expected one of: create setup run supervise logs ssh status stop delete help" ;;
    help) usage; return 0 ;;
    create) require_target; require_accelerator; cmd_create ;;
    setup) require_target; cmd_setup ;;
    run)
      require_target
      require_tool
      if ((RESTART)); then
        require_accelerator
        cmd_supervise
      else
        cmd_run
      fi
      ;;
    supervise) require_target; require_tool; require_accelerator; cmd_supervise ;;
    logs) require_target; cmd_logs ;;
    ssh) require_target; cmd_ssh ;;
    status) require_target; cmd_status ;;
    stop) require_target; cmd_stop ;;
    delete) require_target; cmd_delete ;;
    *) die "unknown command '$COMMAND'; expected one of: create setup run supervise logs ssh status stop delete help" ;;
  esac
}

main "$@"
