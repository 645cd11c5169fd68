#!/usr/bin/env bash
# Install what the tests need (first run only), then run them all: real vLLM, Ray Data/Train and the tiny model.
#   bash scripts/test.sh                    # everything (about 30-40 minutes on 2 CPU cores)
#   bash scripts/test.sh tests/test_dpo_loss.py -k ipo    # any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest "${@:-tests}" -q -p no:cacheprovider
