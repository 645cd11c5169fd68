#!/usr/bin/env bash
# The whole pipeline on the embedded default (SmolLM2-135M-Instruct, ACLSum, MiniLM judge), setting up on first use.
#   bash scripts/quickstart.sh              # ends with a summary table (also in outputs/quickstart/summary.md)
#   bash scripts/quickstart.sh --force      # redo every stage (otherwise complete outputs are reused)
#   bash scripts/quickstart.sh --verbose    # also show the Ray workers' and libraries' own output
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
start=$(date +%s)
for stage in 01_generate/generate.py 02_judge/judge.py 03_dpo_train/train.py 04_evaluate/evaluate.py; do
  name=$(dirname "$stage")
  echo "[quickstart] ===== $name ====="
  "$PY" "$stage" --config "configs/quickstart/$name.yaml" "$@"
done
echo "[quickstart] ===== summary ====="
"$PY" -m common.summary --config configs/quickstart/04_evaluate.yaml --since "$start" "$@"
