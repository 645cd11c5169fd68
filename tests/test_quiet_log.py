"""What a run prints: a real stage, not in a terminal, shows our own lines once each and nothing else (no tracebacks,
no cursor control, no library chatter); and the closing summary of a run (common.summary)."""
import json
import re
from collections import Counter

import pytest

from conftest import STAGE1_CANDIDATES, STAGE1_PROMPTS

from common.summary import main as summary_main
from common.summary import summarize

MAX_LINES = 10  # the resource plan (3 lines) and the stage's one-line summary, with room for a note or two


@pytest.mark.slow
def test_a_real_stage_1_run_is_quiet(stage1_run):
    proc = stage1_run[1]  # the session's stage-1 run (conftest.stage1_run), as run_stage captured it
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "\x1b" not in text, "escape sequences (colours, cursor control) outside a terminal"
    assert "\r" not in text, "carriage returns (progress-bar redraws) outside a terminal"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    twice = [ln for ln, n in Counter(lines).items() if n > 1]
    assert not twice, twice
    assert len(lines) <= MAX_LINES, "\n".join(lines)
    n, k = STAGE1_PROMPTS, STAGE1_CANDIDATES
    assert re.search(rf"\[01_generate\] {n} prompts x {k} candidates = {n * k} responses", proc.stdout), proc.stdout


def _manifest(folder, stage, rows, stats, seconds, created="2026-12-01T21:00:00+0000", **extra):
    folder.mkdir(parents=True)
    m = {"stage": stage, "status": "complete", "created": created, "rows": rows, "stats": stats,
         "seconds": seconds, **extra}
    (folder / "manifest.json").write_text(json.dumps(m))


def test_summary_table_from_the_manifests(tmp_path):
    _manifest(tmp_path / "01_generate", "01_generate", {"candidates": 256}, {"prompts": 64, "prompts_skipped": 0},
              185.2)
    _manifest(tmp_path / "02_judge", "02_judge", {"pairs": 80, "candidates": 256}, {}, 70.0)
    _manifest(tmp_path / "03_dpo_train", "03_dpo_train", {"pairs_trained": 80}, {"steps": 40}, 252.0,
              created="2030-01-01T00:00:00+0000", model=str(tmp_path / "03_dpo_train" / "model"))
    text = summarize(tmp_path, since=1893456000 - 60)  # 2030-01-01 minus a minute: stages 1-2 are reused
    lines = text.splitlines()
    assert lines[0] == "| stage | time | produced | where |"
    assert "| 01_generate | reused (2026-12-01T21:00) | 256 candidates from 64 prompts |" in text
    assert "| 02_judge | reused (2026-12-01T21:00) | 80 pairs from 256 candidates |" in text
    assert f"| 03_dpo_train | 4m 12s | 40 steps on 80 pairs | {tmp_path}/03_dpo_train/model |" in text
    assert "| 04_evaluate | - | not run (no complete output) | - |" in text
    assert "| total | 4m 12s |" in text
    assert "PASS" not in text and "FAIL" not in text  # no stage 4: no bar


def test_summary_ends_with_stage_4s_bar_and_writes_summary_md(tmp_path, capsys):
    _manifest(tmp_path / "01_generate", "01_generate", {"candidates": 8}, {"prompts": 4, "prompts_skipped": 1}, 5)
    targets = [{"check": "win rate vs sft >= 0.60 (got 0.70)", "pass": True},
               {"check": "faithfulness drop <= 0.05 (got 0.08)", "pass": False}]
    _manifest(tmp_path / "04_evaluate", "04_evaluate", {"responses": 12}, {"prompts": 6}, 61,
              report=str(tmp_path / "04_evaluate" / "report.md"), targets=targets)
    summary_main([str(tmp_path), "--force", "--verbose"])  # a stage's own flags come along from quickstart.sh
    out = capsys.readouterr().out
    assert "| 01_generate | 5s | 8 candidates from 3 prompts |" in out
    assert "| 04_evaluate | 1m 01s | 12 judged responses on 6 prompts |" in out
    assert out.rstrip().splitlines()[-5:-2] == ["Stage 4's bar:", "- PASS: win rate vs sft >= 0.60 (got 0.70)",
                                                "- FAIL: faithfulness drop <= 0.05 (got 0.08)"]
    written = (tmp_path / "summary.md").read_text()
    assert "| total | 1m 06s |" in written and written.rstrip().endswith("- FAIL: faithfulness drop <= 0.05 (got 0.08)")


def test_training_progress_lines_from_the_metrics_file(tmp_path, capsys):
    """Not in a terminal, the driver prints each logged step once (rank 0's own lines stay in Ray's log files), with
    rank 0's notes: a resume, the step-0 check, and its warning when policy and reference are the same model."""
    from common.progress import follow_training

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1}) + "\n")  # a killed earlier attempt's record: already shown then
    rec = {"epoch": 1, "total_steps": 3, "loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.01,
           "lr": 1e-4, "tokens_per_second_per_worker": 100.0, "ref_wait_seconds": 0.5}
    with follow_training(metrics, step0_tolerance=0.05):
        with open(metrics, "a") as f:
            f.write(json.dumps({**rec, "step": 2, "resumed_from_step": 1, "step0_max_abs_logp_diff": 0.2}) + "\n")
            f.write(json.dumps({**rec, "step": 3}) + "\n")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[03_dpo_train] resumed from checkpoint at epoch 1, step 1"
    assert lines[1].startswith("[03_dpo_train] step-0 check: max |policy - reference| log-prob = 2.00e-01")
    assert lines[2].startswith("[03_dpo_train] WARNING: policy and reference disagree by 0.2 > 0.05")
    assert lines[3].startswith("[03_dpo_train] epoch 1 step 2/3 loss 0.6900 acc 0.50")
    assert lines[4].startswith("[03_dpo_train] epoch 1 step 3/3 ") and len(lines) == 5
