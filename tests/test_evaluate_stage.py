"""Stage 4 end to end: the real script (real Ray, real vLLM, the embedded model) on 3 held-out prompts.

Stages 2 and 3 are stood in for honestly, through common.io.StageOutput: a stage-2 output whose manifest carries the
default (similarity) judge config, and a stage-3 output whose final model *is* the embedded SFT model. So the DPO
model is compared with itself: greedy decoding gives the same text, every prompt is a tie and the win rate is
exactly 0.5. A third "model", an outputs file of long off-topic text, must lose every prompt. One run of the stage
(two vLLM engine starts) is shared by the assertions; the failure cases stop before Ray starts.
"""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from common import schema as S
from common.config import DPOStageConfig, GenerateConfig, PairingConfig, PromptConfig, load_config
from common.io import StageOutput
from common.plots import plot_training_curves
from conftest import REPO, run_stage

pytestmark = pytest.mark.slow  # starts Ray / vLLM / stage subprocesses: not in `scripts/test.sh --fast`

SCRIPT = "04_evaluate/evaluate.py"
QUICKSTART = REPO / "configs/quickstart/04_evaluate.yaml"
GPU = REPO / "configs/gpu/04_evaluate.yaml"
N_PROMPTS = 3
OFF_TOPIC = ("Bananas are a popular fruit grown in tropical regions, and they are rich in potassium. " * 5).strip()


def fake_generate_stage(run_dir, template):
    """A complete 01_generate output made with prompt `template` (stage 4 compares its own prompt with it)."""
    out = StageOutput(GenerateConfig(output_dir=str(run_dir), prompt=PromptConfig(template=template)), "01_generate")
    out.begin()
    pd.DataFrame({S.PROMPT_ID: ["x"], S.RESPONSE: ["y"]}).to_parquet(out.data / "candidates.parquet")
    return out.commit(rows={"candidates": 1})


def fake_judge_stage(run_dir, generated=None):
    """A complete 02_judge output whose manifest carries the quickstart's judge, filters and pairing rule."""
    cfg = load_config("02_judge", str(REPO / "configs/quickstart/02_judge.yaml"), [f"output_dir={run_dir}"])
    out = StageOutput(cfg, "02_judge", upstream=generated)
    out.begin()
    pd.DataFrame({S.PAIR_ID: ["p0"], S.PROMPT_ID: ["x"]}).to_parquet(out.data / "pairs.parquet")
    return out.commit(rows={"pairs": 1})


def fake_dpo_stage(run_dir, model, with_model=True):
    """A complete 03_dpo_train output whose final model is `model` (the SFT model itself)."""
    out = StageOutput(DPOStageConfig(output_dir=str(run_dir)), "03_dpo_train")
    out.begin()
    steps = [{"step": i, "loss": 0.69 - 0.05 * i, "rewards/accuracies": 0.5 + 0.1 * i, "rewards/margins": 0.02 * i}
             for i in range(1, 5)]
    (out.data / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    plot_training_curves(out.data / "metrics.jsonl", out.path("training_curves.png"))  # as stage 3 does
    extra = {"model": model} if with_model else {}
    return out.commit(rows={"pairs": 1}, metrics_file=str(out.final / "data" / "metrics.jsonl"),
                      curves=str(out.final / "training_curves.png"), **extra)


def held_out_ids(n=N_PROMPTS):
    lines = (REPO / "data/aclsum/test.jsonl").read_text().splitlines()[:n]
    return [json.loads(line)["id"] for line in lines]


def write_outputs(path, ids, text=OFF_TOPIC):
    path.write_text("".join(json.dumps({"id": i, "response": text}) + "\n" for i in ids))
    return path


def settings(run_dir, outputs):
    # max_num_seqs=1: each prompt decoded alone, so the two greedy runs of one model give the same text (vLLM's CPU
    # kernels sum in an order that depends on which sequences share a step)
    return (f"output_dir={run_dir}", f"data.limit={N_PROMPTS}", "sampling.max_tokens=48", "bootstrap_samples=200",
            "engine.max_num_seqs=1",
            f"others=[{{name: offtopic, outputs: {outputs}}}]")


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(REPO / SCRIPT), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def one_line_exit_2(proc):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ---------------------------------------------------------------- one real run, shared
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, model_path):
    run_dir = tmp_path_factory.mktemp("eval_run")
    fake_judge_stage(run_dir, fake_generate_stage(run_dir, "Summarize: {text}"))  # not stage 4's prompt: noted
    fake_dpo_stage(run_dir, model_path)
    outputs = write_outputs(run_dir / "offtopic.jsonl", held_out_ids())
    proc = run_stage(SCRIPT, QUICKSTART, *settings(run_dir, outputs))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    folder = run_dir / "04_evaluate"
    return {"proc": proc, "run_dir": run_dir, "outputs": outputs, "folder": folder,
            "metrics": json.loads((folder / "metrics.json").read_text())}


def test_dpo_against_itself_ties_every_prompt(evaluated):
    wr = evaluated["metrics"]["win_rate"]["dpo"]
    assert (wr["wins"], wr["ties"], wr["losses"], wr["n"]) == (0, N_PROMPTS, 0, N_PROMPTS)
    assert sum(b["ties"] for b in wr["by_branch"].values()) == N_PROMPTS and \
        not any(b["wins"] or b["losses"] for b in wr["by_branch"].values())
    assert wr["win_rate"] == 0.5
    assert wr["ci_low"] <= 0.5 <= wr["ci_high"]
    assert wr["mean_score_delta"] == pytest.approx(0, abs=1e-6) and wr["mean_words_delta"] == 0


def test_off_topic_outputs_lose_every_prompt(evaluated):
    wr = evaluated["metrics"]["win_rate"]["offtopic"]
    assert (wr["wins"], wr["losses"], wr["win_rate"]) == (0, N_PROMPTS, 0.0)
    assert wr["by_branch"] == {"quality": {"wins": 0, "ties": 0, "losses": N_PROMPTS}}  # off topic: unfaithful
    assert wr["ci_low"] <= wr["win_rate"] <= wr["ci_high"]
    models = evaluated["metrics"]["models"]
    assert models["offtopic"]["mean_score"] < models["sft"]["mean_score"] - 0.2
    assert models["offtopic"]["share_hit_max_tokens"] is None  # not generated: no token budget


def test_per_model_metrics_match_the_judged_rows(evaluated):
    df = pd.read_parquet(evaluated["folder"] / "data")
    assert len(df) == 4 * N_PROMPTS  # three models and the human references, judged like a model
    assert sorted(df[S.SYSTEM].unique()) == ["dpo", "human_reference", "offtopic", "sft"]
    refs = df[df[S.SYSTEM] == "human_reference"]
    assert (refs[S.RESPONSE] == refs[S.REFERENCE]).all() and (refs[S.REFERENCE].str.len() > 0).all()
    df = df[df[S.SYSTEM] != "human_reference"]
    assert np.isfinite(df[S.SCORE]).all()
    for name, m in evaluated["metrics"]["models"].items():
        rows = df[df[S.SYSTEM] == name]
        assert m["n"] == N_PROMPTS
        assert m["mean_score"] == pytest.approx(rows[S.SCORE].mean())
        assert m["mean_words"] == pytest.approx(rows[S.NUM_WORDS].mean())
        ratio = rows[S.NUM_WORDS] / rows[S.SOURCE].str.split().str.len()
        assert m["median_compression"] == pytest.approx(ratio.median())
    # greedy decoding of the same model: the same text, prompt by prompt
    a = df[df[S.SYSTEM] == "dpo"].set_index(S.PROMPT_ID)[S.RESPONSE]
    b = df[df[S.SYSTEM] == "sft"].set_index(S.PROMPT_ID)[S.RESPONSE]
    assert (a.sort_index() == b.sort_index()).all()


def test_report_plots_and_manifest_written(evaluated):
    folder, m = evaluated["folder"], evaluated["metrics"]
    report = (folder / "report.md").read_text()
    for text in ("| metric", "| dpo", "sft (baseline)", "offtopic", "win rate vs sft [95% CI]", "50.0%",
                 "... decided on score · on length", f"0 / 0 / {N_PROMPTS} · 0 / 0 / 0",
                 "How to read this", "faithfulness", "Side by side", "Example 1", "training_curves.png",
                 "the prompt differs from stage 1's"):
        assert text in report, text
    for png in ("lengths.png", "scores.png", "win_tie_loss.png", "training_curves.png"):
        assert (folder / png).stat().st_size > 2000, png
    assert m["prompts"] == N_PROMPTS and m["judge"] == "similarity" and m["baseline"] == "sft"
    # 50% < 70%, not shorter, same score; and on the independent signals the same text: same ROUGE-L, same copying
    assert [t["pass"] for t in m["targets"]] == [False, False, True, True, True]
    assert [t["check"].split(" (")[0] for t in m["targets"]][3:] == ["ROUGE-L vs human not lower than sft",
                                                                    "copy share not higher than sft"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["rows"] == {"responses": 3 * N_PROMPTS, "references": N_PROMPTS}
    assert manifest["table"] in report
    out = evaluated["proc"].stdout
    assert "win rate vs sft" in out and "Report:" in out  # the table is printed at the end ...
    assert "FAIL: win rate vs sft >= 70% with its 95% CI above 50% (got 50.0% [" in out  # ... with the bar
    assert "resource plan" in out


def test_signals_beside_the_training_judge(evaluated):
    """Every model gets the independent signals; the report says which signal trained the model."""
    folder, m = evaluated["folder"], evaluated["metrics"]
    for name, row in m["models"].items():
        for key in ("rouge_l", "copy_share", "share_near_verbatim"):
            assert row[key] is not None and 0 <= row[key] <= 1, (name, key)
        assert -1 <= row["reference_similarity"] <= 1  # a cosine: off-topic text can be below 0
        assert row["n_with_reference"] == N_PROMPTS
        assert 0 <= row["judge_vs_reference"]["preferred"] <= 1 and row["judge_vs_reference"]["n"] == N_PROMPTS
    # the same greedy text: the same ROUGE-L and copying; the off-topic text shares nothing with the abstracts
    assert m["models"]["dpo"]["rouge_l"] == m["models"]["sft"]["rouge_l"]
    assert m["models"]["offtopic"]["copy_share"] == 0 and m["models"]["offtopic"]["rouge_l"] < 0.1
    for name in ("dpo", "offtopic"):
        lc = m["win_rate"][name]["length_controlled"]
        assert lc["n"] == N_PROMPTS and lc["ci_low"] <= lc["lc_win_rate"] <= lc["ci_high"]
    assert m["win_rate"]["dpo"]["length_controlled"]["lc_win_rate"] == pytest.approx(0.5, abs=0.01)
    assert "similarity" in m["signals"]["trained_on"] and "pairing rule" in m["signals"]["trained_on"]
    assert any("ROUGE-L" in s for s in m["signals"]["not_trained_on"])
    report = (folder / "report.md").read_text()
    for text in ("What trained the model, and what did not", "Trained on", "Not trained on",
                 "length-controlled [95% CI]", "copy share (4-grams found in the source)", "ROUGE-L F1 vs human",
                 "embedding similarity to human reference", "judge prefers human reference over this model",
                 "PASS: ROUGE-L vs human not lower than sft", "PASS: copy share not higher than sft"):
        assert text in report, text
    assert "PASS: copy share not higher than sft" in evaluated["proc"].stdout


def test_rerun_reuses_the_output(evaluated):
    proc = run_stage(SCRIPT, QUICKSTART, *settings(evaluated["run_dir"], evaluated["outputs"]), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing the complete output" in proc.stdout
    assert "win rate vs sft" in proc.stdout  # the table again, without a rerun


# ---------------------------------------------------------------- bad input: one line, exit 2, before Ray
def test_missing_stage3_output_is_one_line(tmp_path):
    fake_judge_stage(tmp_path)
    line = one_line_exit_2(run_stage(SCRIPT, QUICKSTART, f"output_dir={tmp_path}"))
    assert "03_dpo_train" in line and "first" in line


def test_stage3_without_final_model_is_one_line(tmp_path, model_path):
    fake_judge_stage(tmp_path)
    fake_dpo_stage(tmp_path, model_path, with_model=False)
    line = one_line_exit_2(run_stage(SCRIPT, QUICKSTART, f"output_dir={tmp_path}"))
    assert "no final model" in line


def test_missing_dpo_model_folder_is_one_line(tmp_path):
    fake_judge_stage(tmp_path)
    fake_dpo_stage(tmp_path, str(tmp_path / "gone"))
    line = one_line_exit_2(run_stage(SCRIPT, QUICKSTART, f"output_dir={tmp_path}"))
    assert "not found" in line and "gone" in line


def test_outputs_file_missing_a_prompt_is_one_line(tmp_path, model_path):
    fake_judge_stage(tmp_path)
    fake_dpo_stage(tmp_path, model_path)
    outputs = write_outputs(tmp_path / "partial.jsonl", held_out_ids(2))
    line = one_line_exit_2(run_stage(SCRIPT, QUICKSTART, *settings(tmp_path, outputs)))
    assert "no response for 1 of the 3 prompts" in line


def test_config_errors_are_one_line(tmp_path):
    line = one_line_exit_2(run_stage(SCRIPT, QUICKSTART, f"output_dir={tmp_path}", "sampling.n=2",
                                     "sampling.temperature=0.7"))
    assert "sampling.n: 1" in line
    line = one_line_exit_2(run_stage(SCRIPT, QUICKSTART, f"output_dir={tmp_path}", "others=[{name: sft, path: x}]"))
    assert "unique" in line
    line = one_line_exit_2(run_stage(SCRIPT, QUICKSTART, "others=[{name: x, path: a, outputs: b}]"))
    assert "exactly one of" in line


# ---------------------------------------------------------------- dry runs
def test_gpu_config_dry_run_prints_the_plan(tmp_path):
    proc = cli("--config", GPU, "--dry-run", "--set", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accelerator_type:A10G" in proc.stdout and "cluster at auto" in proc.stdout
    assert "4 x vLLM engine" in proc.stdout
    assert not (tmp_path / "04_evaluate").exists()


def test_quickstart_dry_run_plans_the_judge_of_stage_2(tmp_path):
    fake_judge_stage(tmp_path)
    proc = cli("--config", QUICKSTART, "--dry-run", "--set", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "judge (similarity)" in proc.stdout and "MiniLM" in proc.stdout
    assert "03_dpo_train" in proc.stdout  # noted as missing, not an error, in a dry run


def test_without_stage_2_the_config_gives_the_judge(tmp_path):
    """judge_dir: null (DPO on your own pairs): the config's own blocks, with stage 2's threshold check."""
    line = one_line_exit_2(cli("--config", QUICKSTART, "--dry-run", "--set", f"output_dir={tmp_path}",
                               "--set", "judge_dir=null"))
    assert "pairing.quality_threshold=3 is outside the similarity judge's scores" in line
    proc = cli("--config", QUICKSTART, "--dry-run", "--set", f"output_dir={tmp_path}", "--set", "judge_dir=null",
               "--set", "pairing.quality_threshold=0.6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "judge (similarity)" in proc.stdout


# ---------------------------------------------------------------- the verdict, by hand
def test_verdicts_follow_the_pairing_rule_and_identical_text_ties():
    """Pairing rule defaults: threshold 3, margin 0, length gap 3. Prompts:
    a: both >= 3, model 10 words vs 20          -> shorter wins       -> win  (1.0)
    b: model scores 2 < 3, baseline 4           -> higher score wins  -> loss (0.0)
    c: both >= 3, 11 vs 12 words (gap 1 < 3)    -> tie                -> 0.5
    d: same text, scores differ by float noise  -> tie                -> 0.5
    e: baseline unjudged (NaN)                  -> left out           -> NaN
    """
    from common.report import _branches, by_branch, matches, outcomes

    rows = [("a", 4.0, 10, 4.0, 20), ("b", 2.0, 5, 4.0, 30), ("c", 5.0, 11, 5.0, 12),
            ("d", 1.0, 7, 1.0 + 1e-9, 7), ("e", 4.0, 5, float("nan"), 9)]
    recs = []
    for pid, sa, wa, sb, wb in rows:
        text = "same" if pid == "d" else None
        recs.append({S.PROMPT_ID: pid, S.SYSTEM: "m", S.SCORE: sa, S.NUM_WORDS: wa, S.RESPONSE: text or f"m-{pid}"})
        recs.append({S.PROMPT_ID: pid, S.SYSTEM: "b", S.SCORE: sb, S.NUM_WORDS: wb, S.RESPONSE: text or f"b-{pid}"})
    o = outcomes(pd.DataFrame(recs), "m", "b", PairingConfig())
    assert o.drop("e").to_dict() == {"a": 1.0, "b": 0.0, "c": 0.5, "d": 0.5}
    assert np.isnan(o["e"])

    # which part of the rule decided each: a and c on length, b on score, d the same text; e unjudged, left out
    m = matches(pd.DataFrame(recs), "m", "b", PairingConfig())
    assert m["branch"].drop("e").to_dict() == {"a": "length", "b": "quality", "c": "length", "d": "same_text"}
    got = by_branch(m.dropna(subset=["outcome"]))
    assert got == {"length": {"wins": 1, "ties": 1, "losses": 0}, "quality": {"wins": 0, "ties": 0, "losses": 1},
                   "same_text": {"wins": 0, "ties": 1, "losses": 0}}
    assert _branches({"by_branch": got}) == "0 / 0 / 1 · 1 / 1 / 0 (+1 same text)"
