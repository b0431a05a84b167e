#!/usr/bin/env bash
# The test suite on a fresh machine: set up the venv and run pytest (multi-process tests use gloo on CPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source launch/setup_env.sh
python -m pytest -q -p no:cacheprovider --timeout 900 --durations=15 tests "$@"
