#!/usr/bin/env bash
# Runs on each TPU VM worker (started by `launch/tpu.sh setup`): makes ~/imagen_jax_venv with
# Python >= 3.11 and installs jax[tpu] and requirements.txt into it.
# Environment: JAX_VERSION (pin jax[tpu]; default newest allowed by requirements.txt),
# IMAGEN_JAX_VENV (default ~/imagen_jax_venv).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${IMAGEN_JAX_VENV:-$HOME/imagen_jax_venv}"

find_python() {  # newest python3.X >= 3.11 on PATH (jax >= 0.7 needs 3.11)
  local p
  for p in python3.13 python3.12 python3.11 python3; do
    if command -v "$p" >/dev/null 2>&1 &&
      "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

apt_install() {
  sudo apt-get update -q
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

if ! PY=$(find_python); then
  # Ubuntu 22.04 TPU images ship Python 3.10; 3.11 is in its archive.
  apt_install python3.11 python3.11-venv
  PY=python3.11
fi
if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
  apt_install "$PY-venv"  # Debian and Ubuntu split venv/ensurepip out of the interpreter
fi

if [[ ! -x $VENV/bin/python ]]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "jax[tpu]${JAX_VERSION:+==$JAX_VERSION}" -r requirements.txt
echo "$(hostname): $("$VENV/bin/python" -c 'import sys, jax; print("python", sys.version.split()[0], "jax", jax.__version__)')"
