"""Stage 2 end to end, as a user runs it: a real stage-1 output (the session's 01_generate run on ACLSum abstracts,
real vLLM: conftest.stage1_run), then 02_judge/judge.py with the quickstart config (real Ray Data, real MiniLM):
TRL-format pairs, manifest stats, reuse on rerun, --force, zero pairs and missing input as one line with exit 2."""
import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from common import schema as S
from common.config import REPO
from conftest import STAGE1_CANDIDATES, STAGE1_PROMPTS, copy_stage1, run_stage

pytestmark = pytest.mark.slow  # starts Ray / vLLM / stage subprocesses: not in `scripts/test.sh --fast`

QUICK = REPO / "configs" / "quickstart" / "02_judge.yaml"
GPU = REPO / "configs" / "gpu" / "02_judge.yaml"
JUDGE = "02_judge/judge.py"
CANDIDATES = STAGE1_PROMPTS * STAGE1_CANDIDATES


def one_error_line(proc):
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def stage1(stage1_run, tmp_path_factory):
    return copy_stage1(stage1_run, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def judged(stage1):
    proc = run_stage(JUDGE, QUICK, f"output_dir={stage1}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return stage1 / "02_judge", proc


def test_pairs_in_trl_format(judged):
    out, proc = judged
    pairs = pd.read_parquet(out / "data")
    assert len(pairs) > 0
    for col in (S.PROMPT, S.CHOSEN, S.REJECTED, S.PROMPT_ID, S.PAIR_ID, S.SOURCE, S.CHOSEN_SCORE, S.REJECTED_SCORE,
                S.CHOSEN_WORDS, S.REJECTED_WORDS):
        assert col in pairs.columns, col
    for _, p in pairs.iterrows():
        assert [m["role"] for m in p[S.PROMPT]] == ["user"] and p[S.SOURCE] in p[S.PROMPT][0]["content"]
        (chosen,), (rejected,) = p[S.CHOSEN], p[S.REJECTED]
        assert chosen["role"] == rejected["role"] == "assistant"
        assert chosen["content"] != rejected["content"]
        assert p[S.CHOSEN_WORDS] == len(chosen["content"].split())
        assert p[S.REJECTED_WORDS] == len(rejected["content"].split())
    assert pairs[S.PAIR_ID].is_unique
    assert pairs.groupby(S.PROMPT_ID).size().max() <= 3
    assert "[02_judge]" in proc.stdout and "pairs from" in proc.stdout


def test_manifest_stats_and_side_files(judged):
    out, _ = judged
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "02_judge" and m["status"] == "complete"
    st = m["stats"]
    assert st["candidates"] == CANDIDATES and st["candidates_scored"] + st["unparseable"] == CANDIDATES
    assert m["rows"]["pairs"] == len(pd.read_parquet(out / "data"))
    # the quickstart holds out a share of prompts for stage 3's validation (pairing.valid_fraction)
    valid = pd.read_parquet(out.parent / m["valid_pairs"])  # written relative to output_dir
    assert st["pairs"] == m["rows"]["pairs"] + m["rows"]["valid_pairs"] and len(valid) == m["rows"]["valid_pairs"]
    assert set(st["filtered_by_reason"]) <= {"empty", "too_short", "too_long", "invalid_chars", "duplicate"}
    assert st["pairs_by_rule"]["quality"] + st["pairs_by_rule"]["length"] == st["pairs"]
    for key in ("ties_dropped", "pairs_per_prompt_mean", "pairs_per_prompt_max", "prompts_with_pairs", "score"):
        assert key in st
    cands = pd.read_parquet(out / "candidates.parquet")
    assert len(cands) == CANDIDATES and {S.SCORE, S.NUM_WORDS, S.JUDGE_DETAIL}.issubset(cands.columns)
    assert cands[S.SCORE].between(-1, 1).all()
    for png in ("scores.png", "length_gap.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_rerun_reuses_and_force_redoes(judged):
    out, _ = judged
    before = json.loads((out / "manifest.json").read_text())
    again = run_stage(JUDGE, QUICK, f"output_dir={out.parent}")
    assert again.returncode == 0 and "reusing the complete output" in again.stdout
    assert json.loads((out / "manifest.json").read_text())["created"] == before["created"]
    ids = set(pd.read_parquet(out / "data")[S.PAIR_ID])
    forced = run_stage(JUDGE, QUICK, f"output_dir={out.parent}", force=True)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "reusing" not in forced.stdout
    assert set(pd.read_parquet(out / "data")[S.PAIR_ID]) == ids  # same input, same config: the same pairs


def test_zero_pairs_is_one_line_and_writes_nothing(stage1, tmp_path):
    proc = run_stage(JUDGE, QUICK, f"output_dir={tmp_path}", f"input_dir={stage1 / '01_generate'}",
                     "filters.max_words=1")
    line = one_error_line(proc)
    assert "0 pairs" in line and "nothing for stage 3" in line
    assert not (tmp_path / "02_judge").exists() and not (tmp_path / ".02_judge.partial").exists()


def test_missing_or_corrupt_stage1_output(stage1, tmp_path):
    line = one_error_line(run_stage(JUDGE, QUICK, f"output_dir={tmp_path}"))
    assert "01_generate" in line and "first" in line
    broken = tmp_path / "broken" / "01_generate"
    shutil.copytree(stage1 / "01_generate", broken)
    (broken / "manifest.json").write_text("{not json")
    line = one_error_line(run_stage(JUDGE, QUICK, f"output_dir={tmp_path / 'broken'}"))
    assert "corrupt manifest" in line


def test_threshold_outside_score_range_fails_before_work(tmp_path):
    line = one_error_line(run_stage(JUDGE, QUICK, f"output_dir={tmp_path}", "pairing.quality_threshold=3"))
    assert "pairing.quality_threshold=3" in line


def test_gpu_config_dry_run():
    """The quiz judge with Llama-3.1-70B on 4 x A100 per replica: validated and planned, nothing started."""
    proc = subprocess.run([sys.executable, str(REPO / JUDGE), "--config", str(GPU), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "judge vLLM replica" in proc.stdout and "accelerator_type:A100" in proc.stdout
    assert "GPU: 4" in proc.stdout
