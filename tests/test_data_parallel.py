"""Data parallel for real: 2 Ray Train workers (gloo, fractional CPUs), the quickstart's stage 3.

Two workers with one pair each are the same optimisation as one worker with both pairs: DDP averages the workers'
gradients of their mean losses, which is the gradient of the mean over both pairs. With 2 pairs, every step's
global batch is the whole data set whichever worker receives which pair, so the runs compare step by step. An epoch
resumed on 2 workers is tested in tests/test_resilience.py.

The model is SmolLM2's architecture shrunk to 2 layers of width 64 (conftest.tiny_model): averaging gradients is
about the parameters' layout, not their values, and the 135M model's fp32 runs cost minutes more. The embedded model
trains on 2 workers in tests/test_resilience.py.
"""
import glob
import json

import pandas as pd
import pytest

from common import schema as S
from common.io import read_manifest
from conftest import REPO, run_stage, tiny_model
from test_dpo_stage import write_pairs

pytestmark = pytest.mark.slow  # starts Ray / stage subprocesses: not in `scripts/test.sh --fast`

CONFIG = REPO / "configs/quickstart/03_dpo_train.yaml"
SCRIPT = "03_dpo_train/train.py"
# fp32, so the only difference is the order of float sums; both workers fit 2 cores beside the reference actor
SETS = ["dtype=float32", "num_epochs=4", "learning_rate=1e-3", "warmup_steps=0", "lr_scheduler_type=constant",
        "num_cpus_per_worker=0.5", "cpu_threads_after_reference=null"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    pairs = write_pairs(tmp / "pairs.jsonl", 2)
    model = tiny_model(tmp / "tiny")
    out = {}
    for name, workers, per_worker in (("one", 1, 2), ("two", 2, 1)):
        proc = run_stage(SCRIPT, CONFIG, f"train_path={pairs}", f"output_dir={tmp / name}",
                         f"model_id={model}", f"num_devices={workers}", f"train_batch_size_per_device={per_worker}", *SETS)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        out[name] = tmp / name
    return out


def metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "03_dpo_train" / "metrics.jsonl")]


def adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(glob.glob(str(run_dir / "03_dpo_train" / "adapter" / "*.safetensors"))[0])


def test_two_workers_follow_the_one_worker_loss_curve(runs):
    """Tolerance: the loss is computed from the same fp32 weights up to float-sum order, ~1e-7 relative a step; 1e-5
    leaves room for four steps of it. A pair trained twice, or gradients summed instead of averaged, moves the
    loss by far more (the curve falls by about 0.1 in these four steps)."""
    one, two = metrics(runs["one"]), metrics(runs["two"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    assert one[-1]["loss"] < one[0]["loss"] - 0.05  # it really trained: not two flat lines compared
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-3)
        assert b["rewards/accuracies"] == a["rewards/accuracies"]
    # the metrics are both workers' (averaged, pairs summed), not rank 0's alone
    assert [r["pairs"] for r in two] == [r["pairs"] for r in one] == [2, 2, 2, 2]


def test_two_workers_end_at_the_one_worker_weights(runs):
    """Tolerance 2.5e-4: a quarter of one Adam step at lr 1e-3. Adam's normalised update can turn float-sum noise
    in a near-zero gradient into a visible difference, but only a fraction of a step; a real mismatch moves a weight
    by whole steps."""
    a, b = adapter(runs["one"]), adapter(runs["two"])
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2.5e-4
    assert max(b[k].abs().max().item() for k in b if "lora_B" in k) > 1e-3  # lora_B starts at 0: it moved


def test_each_worker_ran_in_its_own_process_and_the_reference_cache_covers_both_shards_once(runs):
    m = read_manifest(runs["two"] / "03_dpo_train", "03_dpo_train")["stats"]
    assert sorted(t["rank"] for t in m["trainers"]) == [0, 1] and len(set(m["trainer_pids"])) == 2
    cache = pd.read_parquet(glob.glob(str(runs["two"] / "ref_logps" / "*.parquet"))[0])
    assert len(cache) == 2 and cache[S.PAIR_ID].is_unique
