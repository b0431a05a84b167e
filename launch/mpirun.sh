#!/usr/bin/env bash
# skiptron-train under mpirun (OpenMPI or MPICH/Intel MPI's Hydra):
#
#   launch/mpirun.sh -np N [more mpirun options, e.g. --hostfile H / -hosts a,b] --config FILE [dotted.key=value ...]
#
# Every option before --config goes to mpirun; the rest to skiptron-train. Ranks, world size and node-local ranks
# come from MPI through mpi4py; rank 0 chooses the rendezvous (MASTER_ADDR/MASTER_PORT if exported, else its host
# name and a free port) and broadcasts it over MPI (skiptron/parallel/launch.py). Needs mpi4py built for the same
# MPI as this mpirun: `pip install 'skiptron[mpi]'`.
# OpenMPI gets --bind-to none (a rank drives a GPU with several threads), --allow-run-as-root when root, and the
# environment that matters forwarded to remote nodes (-x); Hydra forwards the environment by itself.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MPI_ARGS=()
while [ $# -gt 0 ] && [ "$1" != "--config" ]; do MPI_ARGS+=("$1"); shift; done
[ $# -gt 0 ] || { echo "mpirun.sh: --config FILE is required" >&2; exit 2; }
if ! command -v skiptron-train >/dev/null && [ -f "$ROOT/.venv/bin/activate" ]; then . "$ROOT/.venv/bin/activate"; fi
command -v mpirun >/dev/null || { echo "mpirun.sh: no mpirun on PATH (apt-get install openmpi-bin)" >&2; exit 2; }
if mpirun --version 2>&1 | grep -q "Open MPI"; then
  EXTRA=(--bind-to none)
  [ "$(id -u)" = 0 ] && EXTRA+=(--allow-run-as-root)
  for var in PATH LD_LIBRARY_PATH VIRTUAL_ENV OMP_NUM_THREADS MASTER_ADDR MASTER_PORT DS_ACCELERATOR \
             $(compgen -e | grep -E '^(NCCL_|TORCH_|SKIPTRON_)' || true); do
    [ -n "${!var:-}" ] && EXTRA+=(-x "$var")
  done
  MPI_ARGS=("${EXTRA[@]}" "${MPI_ARGS[@]}")
fi
exec mpirun "${MPI_ARGS[@]}" skiptron-train "$@"
