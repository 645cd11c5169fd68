"""The four stages chained as a user runs them: 01_generate -> 02_judge -> 03_dpo_train -> 04_evaluate, each its own
process with the quickstart config, one `output_dir`, every stage reading the previous one's folder through its
default `input_dir`/`dpo_dir`/`judge_dir`. A handful of prompts and short answers keep it small enough for CI.

Each stage must read the previous stage's real output (its manifest names that folder and its fingerprint), the
counts must agree from stage to stage, and stage 4 must evaluate the model stage 3 trained, not the SFT model
(so vLLM serves stage 3's merged checkpoint as it is).
Stage 3's reference-cache hit on a rerun is tested in test_dpo_stage.py and not repeated here.
"""
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from common import schema as S
from common.io import read_manifest
from conftest import REPO, STAGE1_CANDIDATES, STAGE1_PROMPTS, run_stage

pytestmark = pytest.mark.slow

QUICK = REPO / "configs" / "quickstart"
PROMPTS, CANDIDATES = STAGE1_PROMPTS, STAGE1_CANDIDATES  # stage 1 is the session's shared run
EVAL_PROMPTS, BATCH = 4, 4
MIN_PAIRS = 4
# One pair per prompt at most (the quickstart's cap). Two faithful candidates pair only if one is shorter by
# min_length_gap words: 1 instead of the quickstart's 3, so short answers of nearly equal length still pair and a
# handful of prompts reliably gives MIN_PAIRS.
PAIRING = ("pairing.min_length_gap=1",)


def manifest(out: Path, stage: str) -> dict:
    """A stage's manifest with its paths resolved (they are written relative to output_dir)."""
    return read_manifest(out / stage, stage)


def run(script: str, config: str, out: Path, *sets: str):
    proc = run_stage(script, QUICK / config, f"output_dir={out}", *sets, timeout=1800)  # shared CI runners are slow
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def chain(stage1_run):
    out = stage1_run[0]  # 01_generate on the quickstart config (conftest.stage1_run); the chain goes on from it
    run("02_judge/judge.py", "02_judge.yaml", out, *PAIRING)
    run("03_dpo_train/train.py", "03_dpo_train.yaml", out, f"train_batch_size_per_device={BATCH}",
        "num_epochs=1")  # the quickstart trains 2; one shows the chain (later epochs: test_dpo_stage, test_resilience)
    run("04_evaluate/evaluate.py", "04_evaluate.yaml", out, f"data.limit={EVAL_PROMPTS}", "sampling.max_tokens=48",
        "bootstrap_samples=100")
    return out


def test_every_stage_reads_the_previous_stages_output(chain):
    gen, judge, dpo, ev = (manifest(chain, s) for s in ("01_generate", "02_judge", "03_dpo_train", "04_evaluate"))
    for m in (gen, judge, dpo, ev):
        assert m["status"] == "complete" and Path(m["config"]["output_dir"]) == chain
    assert judge["input"] == {"dir": str(chain / "01_generate"), "fingerprint": gen["fingerprint"]}
    assert dpo["input"] == {"dir": str(chain / "02_judge"), "fingerprint": judge["fingerprint"]}
    assert ev["input"]["dir"] == str(chain / "03_dpo_train")


def test_counts_agree_from_stage_to_stage(chain):
    gen, judge, dpo = (manifest(chain, s) for s in ("01_generate", "02_judge", "03_dpo_train"))
    candidates = pd.read_parquet(chain / "01_generate" / "data")
    assert len(candidates) == PROMPTS * CANDIDATES == judge["stats"]["candidates"]
    pairs = pd.read_parquet(chain / "02_judge" / "data")
    assert len(pairs) == judge["rows"]["pairs"] >= MIN_PAIRS
    assert set(pairs[S.PROMPT_ID]) <= set(candidates[S.PROMPT_ID])
    st = dpo["stats"]
    assert st["pairs_in"] == len(pairs) and st["pairs_trained"] + sum(st["dropped"].values()) == len(pairs)
    trained = pd.read_parquet(chain / "03_dpo_train" / "data")
    assert len(trained) == st["pairs_trained"] and set(trained[S.PAIR_ID]) <= set(pairs[S.PAIR_ID])
    rows = [json.loads(line) for line in open(chain / "03_dpo_train" / "metrics.jsonl")]
    steps = [r["step"] for r in rows if "eval/loss" not in r]
    assert steps == list(range(1, math.ceil(st["pairs_trained"] / BATCH) + 1)) and st["steps"] == steps[-1]
    # the quickstart holds out a share of prompts (pairing.valid_fraction): never trained on, evaluated instead
    valid = pd.read_parquet(judge["valid_pairs"])
    assert len(valid) == judge["rows"]["valid_pairs"] >= 1 and not set(valid[S.PROMPT_ID]) & set(pairs[S.PROMPT_ID])
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, steps[-1]] and evals[0]["eval/num_pairs"] == st["valid_pairs"]
    assert math.isclose(evals[0]["eval/loss"], math.log(2), abs_tol=1e-3)


def test_reference_cache_is_written_beside_the_pairs(chain):
    dpo = manifest(chain, "03_dpo_train")
    assert dpo["stats"]["reference_cache"] == "computed"
    cache = Path(dpo["reference_cache"])
    assert cache.parent == chain / "02_judge" / "ref_logps" and cache.is_file()
    assert len(pd.read_parquet(cache)) == dpo["stats"]["pairs_trained"]


def test_stage_4_evaluates_the_trained_model_against_sft(chain, model_path):
    dpo, ev = manifest(chain, "03_dpo_train"), manifest(chain, "04_evaluate")
    model = dpo["model"]
    assert model == str(chain / "03_dpo_train" / "model") and (Path(model) / "config.json").is_file()
    metrics = json.loads((chain / "04_evaluate" / "metrics.json").read_text())
    assert metrics["models_used"]["dpo"] == model and metrics["baseline"] == "sft"
    assert Path(metrics["models_used"]["sft"]).resolve() == Path(model_path).resolve()
    assert metrics["prompts"] == EVAL_PROMPTS == metrics["win_rate"]["dpo"]["n"]
    assert ev["rows"] == {"responses": 2 * EVAL_PROMPTS, "references": EVAL_PROMPTS}  # the human summaries, judged
    report = (chain / "04_evaluate" / "report.md").read_text()
    assert "# Stage 4: dpo against sft" in report and "win rate vs sft" in report
