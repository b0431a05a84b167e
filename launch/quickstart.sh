#!/usr/bin/env bash
# The main job on a fresh machine: set up, prepare the embedded stdlib corpus (BPE), train `tiny` on 2 CPU
# processes (DP=2) with torchrun. Extra arguments are config overrides, e.g. `parallel.tp=2 train.max_steps=100`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source launch/setup_env.sh
DATA="${SKIPTRON_DATA:-data/stdlib}"
if ! skiptron-data inspect "$DATA" >/dev/null 2>&1; then  # missing, incomplete or of an older format
  skiptron-data prepare --out "$DATA" --tokenizer bpe --vocab-size 8192 --seq-len 256
fi
torchrun --standalone --nproc-per-node "${NPROC:-2}" --no-python \
  skiptron-train --config tiny data.path="$DATA" "$@"
