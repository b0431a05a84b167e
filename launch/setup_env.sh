#!/usr/bin/env bash
# Create .venv (if missing) and install skiptron into it. Sourced by quickstart.sh and tests/run.sh.
# CPU torch 2.13.0 is installed only when the venv has no torch (a GPU machine brings its own build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PY" -m venv "$ROOT/.venv"
fi
VPY="$ROOT/.venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q torch==2.13.0
fi
"$VPY" -m pip install -q -e "$ROOT[test,eval]"
export PATH="$ROOT/.venv/bin:$PATH"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# The JIT-built C++ extensions, built here once rather than by the first of many ranks (or tests) at once.
"$VPY" -m skiptron.training.kernels
