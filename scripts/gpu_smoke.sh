#!/usr/bin/env bash
# Stages 1-4 on the embedded model with the GPUs doing the work, unattended: one PASS/FAIL line per check.
#   bash scripts/gpu_smoke.sh                     # needs >= 1 NVIDIA GPU and `pip install -r requirements-gpu.txt`
#   OUT=/tmp/smoke PY=/opt/venv/bin/python bash scripts/gpu_smoke.sh
# Where the work runs: the vLLM engines of stages 1 and 4 (engine.accelerator_type), the reference pool of stage 3
# (num_gpus) and the stage-3 trainers (use_gpu; two of them, DDP over NCCL, when there are two GPUs).
# The stages join a one-node Ray started here (`ray.address`, the cluster path of the README): a stage's own local
# Ray is sized for the CPU quickstart and refuses GPU asks. The node declares the accelerator_type labels the
# configs ask for, whatever its GPUs are. Exit 0: all PASS; 1: a FAIL (see its log); 2: no GPU here.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RAY="$(dirname "$PY")/ray"
OUT=${OUT:-$PWD/outputs/gpu_smoke}

NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${NGPU:-0}" -lt 1 ]; then
  echo "gpu_smoke: no NVIDIA GPU on this machine (nvidia-smi lists none); nothing checked"
  exit 2
fi

FAILED=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1"; FAILED=1; }
check() {  # check NAME COMMAND...: PASS if the command exits 0
  local name=$1; shift
  if "$@" >>"$OUT/logs/checks.log" 2>&1; then pass "$name"; else fail "$name (log: $OUT/logs/checks.log)"; fi
}
manifest() {  # manifest STAGE PYTHON-EXPR: the expression on the stage's manifest `m` must be true
  "$PY" -c "import json, sys; m = json.load(open('$OUT/$1/manifest.json')); sys.exit(0 if ($2) else 1)"
}
run_stage() {  # run_stage NN_stage SCRIPT --set ...: PASS if the stage exits 0 (LOG=name: another log file)
  local name=$1 script=$2 log=$OUT/logs/${LOG:-$1}.log; shift 2
  if "$PY" "$script" --config "configs/quickstart/$name.yaml" --force "${COMMON[@]}" "$@" >"$log" 2>&1; then
    pass "${LOG:-$name} runs (log: $log)"
  else
    fail "${LOG:-$name} runs (log: $log)"; return 1
  fi
}

mkdir -p "$OUT/logs"; : >"$OUT/logs/checks.log"
echo "gpu_smoke: $NGPU GPU(s); outputs in $OUT"

# bf16 needs compute capability 8.0 (A10G, A100, L4, H100); older GPUs (T4, V100) run vLLM in fp16, training in fp32.
CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
if [ "${CC%%.*}" -ge 8 ] 2>/dev/null; then GEN_DTYPE=bfloat16; TRAIN_DTYPE=bfloat16; else GEN_DTYPE=float16; TRAIN_DTYPE=float32; fi
NTRAIN=$(( NGPU >= 2 ? 2 : 1 ))

check "torch sees CUDA ($NGPU GPU(s))" "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.device_count() >= 1 else 1)"
check "vLLM is a CUDA build" "$PY" -c "from vllm.platforms import current_platform as p; import sys; sys.exit(0 if p.is_cuda() else 1)"
if [ "$FAILED" = 1 ]; then echo "gpu_smoke: install the GPU requirements first (pip install -r requirements-gpu.txt)"; exit 1; fi

# A Ray node of our own: its own temp dir and port, stopped by killing its process group (not `ray stop`).
export RAY_TMPDIR; RAY_TMPDIR=$(mktemp -d /tmp/gsmXXXXXX)
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
setsid "$RAY" start --head --block --port "$PORT" --node-ip-address 127.0.0.1 --temp-dir "$RAY_TMPDIR" \
  --num-gpus "$NGPU" --resources '{"accelerator_type:A10G": 100, "accelerator_type:A100": 100}' \
  --include-dashboard false --disable-usage-stats >"$OUT/logs/ray.log" 2>&1 &
RAY_PID=$!
trap 'kill -TERM -- -"$RAY_PID" 2>/dev/null; sleep 5; kill -KILL -- -"$RAY_PID" 2>/dev/null; rm -rf "$RAY_TMPDIR"' EXIT
ADDR="127.0.0.1:$PORT"
for _ in $(seq 60); do
  "$PY" -c "import ray, sys; ray.init(address='$ADDR', logging_level='ERROR'); sys.exit(0 if ray.cluster_resources().get('GPU', 0) >= $NGPU else 1)" \
    >>"$OUT/logs/checks.log" 2>&1 && break
  sleep 2
done
check "Ray node up with $NGPU GPU(s) at $ADDR" "$PY" -c \
  "import ray, sys; ray.init(address='$ADDR', logging_level='ERROR'); sys.exit(0 if ray.cluster_resources().get('GPU', 0) >= $NGPU else 1)"

COMMON=(--set "output_dir=$OUT" --set "ray.address=$ADDR")
# Several engines may share a GPU over the run: each vLLM takes a share of its memory, not vLLM's default 90%.
ENGINE=(--set engine.accelerator_type=A10G --set "engine.engine_kwargs={gpu_memory_utilization: 0.3}"
        --set "model.dtype=$GEN_DTYPE")

# Stage 1: one vLLM replica per GPU.
if run_stage 01_generate 01_generate/generate.py "${ENGINE[@]}" --set "engine.concurrency=$NGPU" \
    --set data.limit=32 --set sampling.n=4; then
  check "01_generate wrote candidates" manifest 01_generate "m['rows']['candidates'] > 0"
fi

# Stage 2: the quickstart's similarity judge (a small embedder; the CPU is enough).
if run_stage 02_judge 02_judge/judge.py; then
  check "02_judge made pairs" manifest 02_judge "m['rows']['pairs'] > 0"
fi

# Stage 3: trainers and the reference actor share the GPUs. 0.6 + 0.4: each trainer gets a GPU of its own (NCCL
# refuses two ranks on one device) and the reference actor fits beside one of them.
REF=preference_tuning_config.logprob_processor_scaling_config
if run_stage 03_dpo_train 03_dpo_train/train.py --set use_gpu=true --set "num_devices=$NTRAIN" \
    --set "dtype=$TRAIN_DTYPE" --set 'worker_resources={"accelerator_type:A100": 0.001, "GPU": 0.6}' \
    --set "$REF.num_gpus=0.4" --set "$REF.concurrency=1"; then
  check "03_dpo_train: $NTRAIN trainer(s), each on a GPU" manifest 03_dpo_train \
    "len(m['stats']['trainers']) == $NTRAIN and all(t['resources'].get('GPU', 0) > 0 for t in m['stats']['trainers'])"
  check "03_dpo_train: reference actors on a GPU" manifest 03_dpo_train \
    "m['stats']['reference_actors'] and all(r['resources'].get('GPU', 0) > 0 for r in m['stats']['reference_actors'])"
  check "03_dpo_train: trained every pair, finite loss" manifest 03_dpo_train \
    "m['stats']['pairs_trained'] > 0 and m['stats']['final_metrics']['loss'] == m['stats']['final_metrics']['loss']"
  check "03_dpo_train: merged model written" test -f "$OUT/03_dpo_train/model/config.json"
fi

# Stage 3 again under FSDP2 (common/sharding.py) over NCCL, into its own folder: the path tests/test_fsdp.py runs on
# gloo, here with CUDA memory, bf16 and NCCL's reduce-scatter.
if LOG=03_dpo_train_fsdp run_stage 03_dpo_train 03_dpo_train/train.py --set use_gpu=true --set "num_devices=$NTRAIN" \
    --set "dtype=$TRAIN_DTYPE" --set 'worker_resources={"accelerator_type:A100": 0.001, "GPU": 0.6}' \
    --set "$REF.num_gpus=0.4" --set "$REF.concurrency=1" --set strategy=fsdp \
    --set "input_dir=$OUT/02_judge" --set "output_dir=$OUT/fsdp"; then
  check "03_dpo_train under FSDP: trained every pair, finite loss" manifest fsdp/03_dpo_train \
    "m['stats']['pairs_trained'] > 0 and m['stats']['final_metrics']['loss'] == m['stats']['final_metrics']['loss']"
  check "03_dpo_train under FSDP: gathered model loads in transformers" "$PY" -c \
    "from transformers import AutoModelForCausalLM as M; M.from_pretrained('$OUT/fsdp/03_dpo_train/model')"
fi

# Stage 4: the DPO model and the SFT baseline through vLLM on a GPU, one at a time.
if run_stage 04_evaluate 04_evaluate/evaluate.py "${ENGINE[@]}" --set data.limit=16; then
  check "04_evaluate compared dpo and sft" manifest 04_evaluate \
    "m['rows']['responses'] > 0 and 'dpo' in m['stats']['win_rate']"
fi

if [ "$FAILED" = 0 ]; then echo "gpu_smoke: all checks PASS"; else echo "gpu_smoke: FAIL (logs in $OUT/logs)"; fi
exit "$FAILED"
