#!/usr/bin/env bash
# The main job: set up if needed, run the default federation (all-MiniLM-L6-v2 + LoRA on
# 20 Newsgroups, 10 Dirichlet clients), write its report, and export the edge model.
# Extra arguments go to `fedtune simulate` (e.g. --set rounds=6).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${FEDTUNE_VENV:-.venv}"
RUN="${FEDTUNE_RUN:-runs/default}"
"$VENV/bin/fedtune" simulate --out "$RUN" "$@"
"$VENV/bin/fedtune" report "$RUN"
"$VENV/bin/fedtune" export "$RUN" --int8 --latency-runs 20 --out "$RUN/edge"
echo "report:     $RUN/report.html"
echo "edge model: $RUN/edge  (try: $VENV/bin/fedtune infer $RUN/edge \"my graphics card driver crashes\")"
