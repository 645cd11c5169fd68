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

from conftest import REPO, run_stage
from test_dpo_stage import write_pairs

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


def test_train_worker_killed_mid_run_resumes_from_the_last_checkpoint(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    metrics = tmp_path / ".03_dpo_train.work" / "metrics.jsonl"
    killed = []

    def after_step_3():
        if not metrics.exists():
            return False
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if rows and rows[-1]["step"] >= 3 and not killed:
            os.kill(rows[-1]["trainer_pid"], signal.SIGKILL)  # the worker only, not the driver
            killed.append(rows[-1]["trainer_pid"])
        return False

    proc = start("03_dpo_train/train.py", DPO_CONFIG, f"train_path={pairs}", f"output_dir={tmp_path}",
                 "num_epochs=2", "train_batch_size_per_device=2", "checkpoint_every_n_steps=2", "max_failures=2")
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline:
        after_step_3()
        time.sleep(0.3)
    assert killed, "training finished before the worker could be killed"
    assert proc.returncode == 0
    m = json.loads((tmp_path / "03_dpo_train" / "manifest.json").read_text())
    rows = [json.loads(line) for line in open(tmp_path / "03_dpo_train" / "metrics.jsonl")]
    assert m["stats"]["steps"] == 8 and {r["step"] for r in rows} == set(range(1, 9))
    assert len({r["trainer_pid"] for r in rows}) == 2  # the killed worker and its replacement
    # resumed from the step-2 checkpoint, not from scratch: step 1 ran once, steps 3.. possibly twice
    assert [r["step"] for r in rows].count(1) == 1
