#!/usr/bin/env bash
# bench/accuracy.py on the GPU test machine (issue 18): the (partition, seed) cells train in
# parallel processes that share the GPU (--jobs), as the in-process plain loop (--loop plain:
# no Ray needed there). Carry folders first (../shared/gpu/README.md; MiniLM, 20 Newsgroups,
# flwr and the rest, no ray / bitsandbytes), then in the last command:
#   cp -r .gpu/cN /tmp/stage/ && bash scripts/gpu_accuracy.sh ARGS...
# ARGS go to bench/accuracy.py. What comes back in $OUT: summary.txt, benchmarks.md (the section
# written there), accuracy.jsonl (every finished run: copy to runs/bench/ here and rerun the
# command with --stored to re-render), and the cells' logs (logs.tgz).
# GPU_ACCURACY_SECONDS bounds the training (default 420 s): the table reports what finished.
set -uo pipefail
FINAL=${OUT:-/tmp/gpu-accuracy}
mkdir -p "$FINAL"
pack() {
  cp runs/bench/accuracy.jsonl docs/benchmarks.md "$FINAL/" 2>/dev/null
  tar czf "$FINAL/logs.tgz" runs/bench/*.log 2>/dev/null
}
trap pack EXIT
log() { echo "[$(date +%T)] $*" | tee -a "$FINAL/summary.txt"; }
last=$(ls -d /tmp/stage/c* 2>/dev/null | sort -V | tail -n 1)
[ -n "$last" ] || { log "no /tmp/stage/c*: carry the wheel folders first"; exit 2; }
bash "$last/install.sh" > "$FINAL/install.log" 2>&1 || { log "install failed"; tail -5 "$FINAL/install.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD FLWR_TELEMETRY_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTHONWARNINGS=ignore OMP_NUM_THREADS=2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$FINAL/summary.txt"
t=$(date +%s)
timeout "${GPU_ACCURACY_SECONDS:-420}" python3 bench/accuracy.py "$@" > "$FINAL/train.log" 2>&1
log "training: rc=$? in $(( $(date +%s) - t )) s"
tail -n 15 "$FINAL/train.log"
python3 bench/accuracy.py "$@" --stored > "$FINAL/table.log" 2>&1
log "table: rc=$?"
sed -n '/^| partition/,$p' "$FINAL/table.log" | head -60
