#!/usr/bin/env bash
# skiptron-train under torchrun, on one node or several:
#
#   launch/torchrun.sh --nproc-per-node N --config FILE [dotted.key=value ...]                    # one node
#   launch/torchrun.sh --nproc-per-node N --nnodes M --master ADDR:PORT --config FILE [...]      # run on each node
#   launch/torchrun.sh --nproc-per-node N --nnodes M --node-rank R --master ADDR:PORT --config FILE [...]
#
# Several nodes without --node-rank use c10d rendezvous at ADDR:PORT (node ranks in arrival order; the run id is
# SKIPTRON_RUN_ID, else SLURM_JOB_ID); with --node-rank the rendezvous is static (node R gets ranks R*N..R*N+N-1).
# ADDR is one of the nodes, given by you or by the scheduler (launch/slurm/train.sbatch passes its first host):
# nothing here guesses a network interface. Nodes wait for each other up to SKIPTRON_RDZV_TIMEOUT seconds (600).
# Everything from --config on goes to skiptron-train.
#
# Recovery: --max-restarts K (default 0) restarts all ranks after a failure (a killed rank, the watchdog's
# verdict), up to K times; each restart resumes from the newest complete checkpoint (resume=auto).
# Preemption: send SIGTERM or SIGUSR1 to THIS script (not to torchrun: torchrun answers SIGTERM by killing its
# workers within 30 s and exits 1). The script forwards SIGUSR1 to the ranks, they save at the next step boundary,
# and the script exits with 75 (training/signals.py's EXIT_PREEMPTED), restarts or not. torchrun itself ignores
# SIGUSR1 (inherited), so `scancel --signal=USR1` reaching every process of a step stops the run the same way.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NPROC=1 NNODES=1 NODE_RANK="" MASTER="" RESTARTS=0
while [ $# -gt 0 ] && [ "$1" != "--config" ]; do
  case "$1" in
    --nproc-per-node) NPROC="$2"; shift 2 ;;
    --nnodes) NNODES="$2"; shift 2 ;;
    --node-rank) NODE_RANK="$2"; shift 2 ;;
    --master) MASTER="$2"; shift 2 ;;
    --max-restarts) RESTARTS="$2"; shift 2 ;;
    *) echo "torchrun.sh: unknown option $1 (options: --nproc-per-node --nnodes --node-rank --master" \
            "--max-restarts, then --config)" >&2
       exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "torchrun.sh: --config FILE is required" >&2; exit 2; }
if ! command -v skiptron-train >/dev/null && [ -f "$ROOT/.venv/bin/activate" ]; then . "$ROOT/.venv/bin/activate"; fi
ARGS=(--nproc-per-node "$NPROC" --max-restarts "$RESTARTS")
if [ "$NNODES" = 1 ] && [ -z "$MASTER" ]; then
  ARGS+=(--standalone)
elif [ -z "$MASTER" ]; then
  echo "torchrun.sh: --nnodes $NNODES needs --master ADDR:PORT (one of the nodes)" >&2; exit 2
elif [ -n "$NODE_RANK" ]; then
  ARGS+=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "${MASTER%:*}" --master-port "${MASTER##*:}"
         --rdzv-conf "timeout=${SKIPTRON_RDZV_TIMEOUT:-600}")
else
  ARGS+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER"
         --rdzv-id "${SKIPTRON_RUN_ID:-${SLURM_JOB_ID:-skiptron}}" --rdzv-conf "join_timeout=${SKIPTRON_RDZV_TIMEOUT:-600}")
fi
# A rank that stopped for a signal writes 75 here (training/trainer.py); restarted workers then stop at once.
SKIPTRON_EXIT_STATUS_FILE="$(mktemp "${TMPDIR:-/tmp}/skiptron-exit.XXXXXX")"
export SKIPTRON_EXIT_STATUS_FILE
trap '' USR1  # inherited by torchrun (which sets no handler of its own); the ranks install theirs
torchrun "${ARGS[@]}" --no-python skiptron-train "$@" &
TORCHRUN_PID=$!
stop_ranks() {
  echo "[torchrun.sh] $1: asking the ranks to checkpoint and stop" >&2
  for worker in $(pgrep -P "$TORCHRUN_PID"); do kill -USR1 "$worker" 2>/dev/null || true; done
}
trap 'stop_ranks SIGTERM' TERM
trap 'stop_ranks SIGUSR1' USR1
set +e
while kill -0 "$TORCHRUN_PID" 2>/dev/null; do wait "$TORCHRUN_PID"; done  # a trapped signal interrupts `wait`
wait "$TORCHRUN_PID"
RC=$?
if [ "$(cat "$SKIPTRON_EXIT_STATUS_FILE" 2>/dev/null)" = 75 ]; then RC=75; fi
rm -f "$SKIPTRON_EXIT_STATUS_FILE"
exit "$RC"
