#!/usr/bin/env bash
# Install what the tests need (first run only), then run them: real vLLM, Ray Data/Train and the tiny model.
#   bash scripts/test.sh                    # everything, as CI runs it (about an hour on 2 CPU cores)
#   bash scripts/test.sh --fast             # the unit tier: tests marked `slow` (Ray, vLLM, stage runs) left out
#   bash scripts/test.sh tests/test_dpo_loss.py -k ipo    # any pytest arguments (also after --fast)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -m "not slow" "$@"
fi
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest "${@:-tests}" -q -p no:cacheprovider
