#!/usr/bin/env bash
# The test suite on a fresh machine: set up the venv and run pytest (multi-process tests use gloo on CPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source launch/setup_env.sh
# SLURM, munge and OpenMPI for tests/test_launch.py (a real local 2-node cluster, mpirun through mpi4py): installed
# when missing, if we are root with apt-get; elsewhere those tests skip and say why. Nothing is left running.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
   && ! { command -v slurmctld && command -v munged && command -v mpirun; } >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge openmpi-bin \
   libopenmpi-dev) >/dev/null || echo "tests/run.sh: apt-get could not install SLURM/MPI; those tests will skip" >&2
fi
if command -v mpirun >/dev/null && ! python -c "import mpi4py" 2>/dev/null; then
  python -m pip install -q "mpi4py>=3.1" || echo "tests/run.sh: mpi4py did not install; the mpirun test will skip" >&2
fi
python -m pytest -q -p no:cacheprovider --timeout 900 --durations=15 tests "$@"
