"""Failures a long run meets: a stage SIGKILLed part-way and rerun, a training worker killed mid-run.

Real processes, real signals; nothing is simulated."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from common.io import read_manifest
from conftest import REPO, STAGE1_CANDIDATES, STAGE1_PROMPTS, copy_stage1, run_stage, training_progress
from test_dpo_stage import write_pairs

pytestmark = pytest.mark.slow  # starts Ray / vLLM / stage subprocesses: not in `scripts/test.sh --fast`

GEN_CONFIG = REPO / "configs/quickstart/01_generate.yaml"
DPO_CONFIG = REPO / "configs/quickstart/03_dpo_train.yaml"


def start(script: str, config: Path, *sets: str) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / script), "--config", str(config)]
    for s in sets:
        cmd += ["--set", s]
    # A session of its own, so the kill takes the stage's Ray processes (raylet, workers, vLLM) with it.
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.5)
    raise AssertionError("the stage finished or never got to the point to kill it")


def test_generate_killed_part_way_leaves_nothing_complete_and_rerun_finishes(tmp_path):
    sets = [f"output_dir={tmp_path}", "data.limit=6", "sampling.n=2", "sampling.max_tokens=48"]
    proc = start("01_generate/generate.py", GEN_CONFIG, *sets)
    partial = tmp_path / ".01_generate.partial"
    kill_when(proc, lambda: partial.exists() and time.sleep(8) is None)  # mid-generation
    assert not (tmp_path / "01_generate").exists()  # nothing that looks complete
    rerun = run_stage("01_generate/generate.py", GEN_CONFIG, *sets)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    df = pd.read_parquet(tmp_path / "01_generate" / "data")
    assert len(df) == 12 and not df.duplicated(["prompt_id", "candidate_index"]).any()
    assert not partial.exists()


def test_two_workers_one_killed_mid_epoch_resume_and_train_every_pair_once(tmp_path):
    """2 workers, 8 pairs, one pair per worker a step: 4 steps an epoch, a checkpoint every 2. Rank 0's process is
    killed after step 3; Ray Train restarts both workers from the step-2 checkpoint, which holds the pairs *both*
    workers had trained on, so the rest of epoch 1 trains each of the other pairs once, on whichever worker the
    new split gives it (the shares may differ: the worker with fewer steps along)."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    work = tmp_path / ".03_dpo_train.work"
    killed = []

    def after_step_3():
        last, checkpointed = training_progress(work)
        if last["step"] >= 3 and checkpointed == 2 and not killed:  # the step-2 checkpoint is one a restart finds
            os.kill(last["trainer_pid"], signal.SIGKILL)  # rank 0's worker only, not the driver
            killed.append(last["trainer_pid"])

    proc = start("03_dpo_train/train.py", DPO_CONFIG, f"train_path={pairs}", f"output_dir={tmp_path}",
                 "num_epochs=2", "num_devices=2", "train_batch_size_per_device=1", "num_cpus_per_worker=0.5",
                 "cpu_threads_after_reference=null", "checkpoint_every_n_steps=2", "max_failures=2")
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline:
        after_step_3()
        time.sleep(0.3)
    assert killed, "training finished before the worker could be killed"
    assert proc.returncode == 0
    m = read_manifest(tmp_path / "03_dpo_train", "03_dpo_train")["stats"]
    rows = [json.loads(line) for line in open(tmp_path / "03_dpo_train" / "metrics.jsonl")]
    resumed = next(i for i, r in enumerate(rows) if "resumed_from_step" in r)
    assert rows[resumed]["resumed_from_step"] == 2  # from the checkpoint, not from scratch
    assert [r["step"] for r in rows].count(1) == 1
    # what stands: steps 1-2 of the first attempt, then everything the resumed workers did
    kept = [r for r in rows[:resumed] if r["step"] <= 2] + rows[resumed:]
    by_epoch = {e: sum(r["pairs"] for r in kept if r["epoch"] == e) for e in (1, 2)}
    assert by_epoch == {1: 8, 2: 8}, kept
    assert len(m["trainer_pids"]) >= 4  # two workers, both replaced
    # The restarted attempt's reference actors, and epoch 2's pass (epoch 1 was resumed: no worker kept its whole
    # share), found the pairs already scored in the store: not 8 per pass, only a batch in flight at the kill again.
    assert 8 <= m["reference_rows_computed"] < 16, m["reference_rows_computed"]


# ------------------------------------------------- stages 2, 3 and 4 SIGKILLed part-way, then rerun
def actor_running(proc: subprocess.Popen, name: str, seconds: float):
    """Ready to kill `seconds` after a Ray worker process of the stage's own session shows `name` in its title
    (Ray titles an actor's process after its class): the stage is then mid-work, before it writes anything."""
    since = []

    def alive() -> bool:
        for d in Path("/proc").glob("[0-9]*"):
            try:
                sid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[3])
                if sid == proc.pid and name in (d / "cmdline").read_bytes().decode(errors="replace"):
                    return True
            except (OSError, IndexError, ValueError):
                continue
        return False

    def ready():
        if not since and alive():
            since.append(time.time())
        return bool(since) and time.time() - since[0] >= seconds
    return ready


def test_judge_killed_part_way_and_rerun_scores_every_candidate_once(stage1_run, tmp_path):
    copy_stage1(stage1_run, tmp_path)  # a real stage-1 output (conftest.stage1_run)
    config = REPO / "configs/quickstart/02_judge.yaml"
    proc = start("02_judge/judge.py", config, f"output_dir={tmp_path}")
    kill_when(proc, actor_running(proc, "_Embedder", 2))  # the judge's actor: mid-judging
    assert not (tmp_path / "02_judge").exists()
    rerun = run_stage("02_judge/judge.py", config, f"output_dir={tmp_path}")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    scored = pd.read_parquet(tmp_path / "02_judge" / "candidates.parquet")
    assert len(scored) == STAGE1_PROMPTS * STAGE1_CANDIDATES and not scored.duplicated(["prompt_id", "candidate_index"]).any()
    pairs = pd.read_parquet(tmp_path / "02_judge" / "data")
    manifest = json.loads((tmp_path / "02_judge" / "manifest.json").read_text())
    assert len(pairs) == manifest["rows"]["pairs"] and pairs["pair_id"].is_unique
    assert not (tmp_path / ".02_judge.partial").exists()


def test_train_driver_killed_mid_run_rerun_resumes_from_its_checkpoint(tmp_path):
    """The whole stage (driver, Ray, workers) dies; the same command again continues from the last checkpoint in
    `.03_dpo_train.work/` instead of starting over, and trains on every pair of the epoch exactly once."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    sets = [f"train_path={pairs}", f"output_dir={tmp_path}", "num_epochs=1", "train_batch_size_per_device=1",
            "checkpoint_every_n_steps=2"]

    def after_step_3():
        last, checkpointed = training_progress(tmp_path / ".03_dpo_train.work")
        return last["step"] >= 3 and checkpointed == 2  # the step-2 checkpoint is one the rerun finds

    proc = start("03_dpo_train/train.py", DPO_CONFIG, *sets)
    kill_when(proc, after_step_3, timeout=900)
    assert not (tmp_path / "03_dpo_train").exists()
    # The reference log-probs the killed run computed, stored as it went (common.reference.ReferenceStore)
    # (one part per actor call of `batch_size` pairs). On this small set the pool is far ahead of the trainer and
    # has scored every pair by step 3; at scale it lags, as if its last part were missing: dropped here, so the
    # rerun must both read pairs back and score the rest (a trained pair among them is scored, then skipped).
    parts = sorted((tmp_path / ".03_dpo_train.work" / "reference_logps").glob("*/part-*.parquet"),
                   key=lambda p: p.stat().st_mtime)
    assert len(parts) >= 2, parts
    parts.pop().unlink()
    stored = set(pd.concat([pd.read_parquet(p) for p in parts])["pair_id"])
    assert 0 < len(stored) < 8
    rerun = run_stage("03_dpo_train/train.py", DPO_CONFIG, *sets)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from checkpoint" in rerun.stdout + rerun.stderr
    rows = [json.loads(line) for line in open(tmp_path / "03_dpo_train" / "metrics.jsonl")]
    m = json.loads((tmp_path / "03_dpo_train" / "manifest.json").read_text())
    assert m["stats"]["steps"] == 8 and {r["step"] for r in rows} == set(range(1, 9))
    assert [r["step"] for r in rows].count(1) == 1  # steps 1-2 were not trained again
    assert len({r["trainer_pid"] for r in rows}) == 2  # the first run's worker and the rerun's
    # the rerun's pool scored only the pairs the killed run had not: the others were read back
    assert m["stats"]["reference_rows_reused"] == len(stored), m["stats"]
    assert m["stats"]["reference_rows_computed"] == 8 - len(stored), m["stats"]
    assert m["stats"]["reference_actors"]  # the pool ran, for those only
    # and the resumed epoch's reference log-probs still make the full cache, every pair once
    cache = pd.read_parquet(tmp_path / m["reference_cache"])
    assert len(cache) == 8 and cache["pair_id"].is_unique
    assert sorted(pd.read_parquet(tmp_path / "03_dpo_train" / "data")["pair_id"]) == sorted(cache["pair_id"])


def test_evaluate_killed_part_way_and_rerun_judges_every_prompt_once(tmp_path, model_path):
    from test_evaluate_stage import fake_dpo_stage, fake_generate_stage, fake_judge_stage

    fake_judge_stage(tmp_path, fake_generate_stage(tmp_path, "Summarize: {text}"))
    fake_dpo_stage(tmp_path, model_path)
    config = REPO / "configs/quickstart/04_evaluate.yaml"
    sets = [f"output_dir={tmp_path}", "data.limit=3", "sampling.max_tokens=32", "bootstrap_samples=100"]
    proc = start("04_evaluate/evaluate.py", config, *sets)
    kill_when(proc, actor_running(proc, "vLLMEngineStageUDF", 15))  # the first model's engine: mid-generation
    assert not (tmp_path / "04_evaluate").exists()
    rerun = run_stage("04_evaluate/evaluate.py", config, *sets)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    metrics = json.loads((tmp_path / "04_evaluate" / "metrics.json").read_text())
    judged = pd.read_parquet(tmp_path / "04_evaluate" / "data")
    # dpo, sft and the human summaries (judged too, for the judge's sanity check): each prompt once each
    assert set(judged["model"]) == {"dpo", "sft", "human_reference"}, set(judged["model"])
    assert len(judged) == 3 * 3 and not judged.duplicated(["prompt_id", "model"]).any(), judged.columns.tolist()
    assert metrics["win_rate"]  # the head-to-head was computed on the rerun
