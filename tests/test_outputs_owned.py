"""Outputs are owned: a stage writes only its own folders under output_dir and never deletes what it did not make.

The refusals happen before Ray starts (stage.parse checks output_dir right after loading the config, StageOutput
again when it is built), so the stage scripts run here as subprocesses in seconds. Then the manifests' paths: inside
output_dir they are recorded relative to it, so a run copied to other storage still reads.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from common import schema as S
from common.config import DPOStageConfig, GenerateConfig
from common.errors import UserError
from common.io import MARKER, STAGE_SCRIPTS, StageOutput, read_manifest
from conftest import REPO, one_line_error, run_stage

QUICK = {stage: REPO / f"configs/quickstart/{stage}.yaml" for stage in STAGE_SCRIPTS}
JUDGE = STAGE_SCRIPTS["02_judge"]
GENERATE = STAGE_SCRIPTS["01_generate"]


def tree_hash(*folders) -> str:
    """Names and bytes of every file under `folders`: equal before and after means nothing changed."""
    h = hashlib.sha256()
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            h.update(str(p.relative_to(folder)).encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def fake_output(run_dir, stage="01_generate", **extra):
    """A complete output made through StageOutput, as a stage makes it."""
    cfg = GenerateConfig(output_dir=str(run_dir)) if stage == "01_generate" else DPOStageConfig(output_dir=str(run_dir))
    out = StageOutput(cfg, stage)
    out.begin()
    pd.DataFrame({S.PROMPT_ID: ["x"], S.RESPONSE: ["y"]}).to_parquet(out.data / "part.parquet")
    return out, out.commit(rows={"candidates": 1}, **extra)


# ---------------------------------------------------------------- code is never an output_dir
def test_repo_root_as_output_dir_is_refused_and_nothing_changes():
    """The reported bug: `--set output_dir=.` made stage 2 replace the code folder 02_judge/ with its output."""
    code = [REPO / s.split("/")[0] for s in STAGE_SCRIPTS.values()] + [REPO / "common"]
    before = tree_hash(*code)
    line = one_line_error(run_stage(JUDGE, QUICK["02_judge"], "output_dir=."))
    assert "cookbook's code" in line and "output_dir ." in line
    assert tree_hash(*code) == before and (REPO / JUDGE).is_file()


def test_a_copy_of_the_repo_layout_is_refused_and_nothing_deleted(tmp_path):
    copy = tmp_path / "checkout"
    for script in STAGE_SCRIPTS.values():
        (copy / script).parent.mkdir(parents=True)
        shutil.copy(REPO / script, copy / script)
    before = tree_hash(copy)
    for stage, script in STAGE_SCRIPTS.items():
        line = one_line_error(run_stage(script, QUICK[stage], f"output_dir={copy}", force=True))
        assert "holds code" in line and str(copy) in line, line
    assert tree_hash(copy) == before


def test_a_folder_holding_a_git_checkout_is_refused(tmp_path):
    (tmp_path / ".git").mkdir()
    line = one_line_error(run_stage(GENERATE, QUICK["01_generate"], f"output_dir={tmp_path}"))
    assert "holds code" in line and ".git" in line


# ---------------------------------------------------------------- a user's files are never replaced
def test_a_users_folder_named_like_a_stage_is_refused(tmp_path):
    mine = tmp_path / "02_judge"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    before = tree_hash(tmp_path)
    line = one_line_error(run_stage(JUDGE, QUICK["02_judge"], f"output_dir={tmp_path}", force=True))
    assert f"{mine} exists and was not made by 02_judge" in line and "choose another output_dir" in line
    assert tree_hash(tmp_path) == before


def test_force_on_an_output_holding_a_users_file_is_refused(tmp_path):
    fake_output(tmp_path)
    (tmp_path / "01_generate" / "notes.txt").write_text("mine")
    before = tree_hash(tmp_path)
    line = one_line_error(run_stage(GENERATE, QUICK["01_generate"], f"output_dir={tmp_path}", force=True))
    assert "notes.txt, which 01_generate did not write" in line
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("name", [".01_generate.partial", ".01_generate.work", ".01_generate.old"])
def test_unmarked_hidden_folders_are_refused(tmp_path, name):
    (tmp_path / name).mkdir()
    (tmp_path / name / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=f"{name} exists and was not made by 01_generate"):
        StageOutput(GenerateConfig(output_dir=str(tmp_path)), "01_generate", force=True)
    assert (tmp_path / name / "keep.txt").exists()


def test_a_file_added_during_the_run_stops_the_replacement_and_keeps_the_new_output(tmp_path):
    fake_output(tmp_path)
    out = StageOutput(GenerateConfig(output_dir=str(tmp_path)), "01_generate", force=True)
    out.begin()
    pd.DataFrame({S.PROMPT_ID: ["x"]}).to_parquet(out.data / "part.parquet")
    (tmp_path / "01_generate" / "notes.txt").write_text("added while the stage ran")
    with pytest.raises(UserError, match="the new output is complete in"):
        out.commit(rows={"candidates": 1})
    assert (tmp_path / "01_generate" / "notes.txt").exists()
    assert (tmp_path / ".01_generate.partial" / "manifest.json").exists()


def test_own_outputs_are_replaced_and_every_folder_is_marked(tmp_path):
    fake_output(tmp_path)
    assert (tmp_path / "01_generate" / MARKER).read_text().strip() == "01_generate"
    manifest = json.loads((tmp_path / "01_generate" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"data", MARKER, "manifest.json"}
    fake_output(tmp_path)  # --force over its own output: allowed
    # an output written before markers existed (manifest only, known files) is still ours to replace
    (tmp_path / "01_generate" / MARKER).unlink()
    StageOutput(GenerateConfig(output_dir=str(tmp_path)), "01_generate", force=True)


def test_work_folder_is_marked_survives_a_crash_and_force_starts_it_over(tmp_path):
    cfg = DPOStageConfig(output_dir=str(tmp_path))
    work = StageOutput(cfg, "03_dpo_train").work_dir()
    (work / "checkpoint").write_text("step 2")
    assert (work / MARKER).exists()
    assert (StageOutput(cfg, "03_dpo_train").work_dir() / "checkpoint").exists()  # a rerun resumes from it
    forced = StageOutput(cfg, "03_dpo_train", force=True).work_dir()
    assert not (forced / "checkpoint").exists() and (forced / MARKER).exists()


# ---------------------------------------------------------------- output_dir that cannot be written
def test_output_dir_that_is_a_file_is_refused_before_work(tmp_path):
    f = tmp_path / "run"
    f.write_text("not a folder")
    line = one_line_error(run_stage(JUDGE, QUICK["02_judge"], f"output_dir={f}"))
    assert "is a file, not a folder" in line
    line = one_line_error(run_stage(JUDGE, QUICK["02_judge"], f"output_dir={f}/sub"))
    assert f"cannot be made: {f} is a file" in line
    assert f.read_text() == "not a folder"


def test_unwritable_output_dir_is_refused_before_work(tmp_path):
    if os.geteuid() == 0:  # root writes through chmod; sysfs takes no new files from anyone
        target = "/sys/cookbook-run"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        target = str(locked / "run")
    line = one_line_error(run_stage(JUDGE, QUICK["02_judge"], f"output_dir={target}"))
    assert "is not writable" in line and "give a folder you can write to" in line
    assert not os.path.exists(target)


def test_dry_run_looks_at_nothing_on_disk(tmp_path):
    """--dry-run plans only, so an output_dir that does not work yet (made on the cluster later) is no error."""
    (tmp_path / "f").write_text("")
    proc = subprocess.run([sys.executable, str(REPO / JUDGE), "--config", str(QUICK["02_judge"]), "--set",
                           f"output_dir={tmp_path / 'f' / 'x'}", "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------------------- relative paths in manifests
def test_manifest_paths_are_relative_to_output_dir_and_read_after_a_move(tmp_path):
    run = tmp_path / "cluster" / "run"
    _, judged = fake_output(run)  # stands in for stage 2's output (its manifest is the upstream)
    cfg = DPOStageConfig(output_dir=str(run))
    out = StageOutput(cfg, "03_dpo_train", upstream=judged)
    out.begin()
    pd.DataFrame({S.PAIR_ID: ["p0"]}).to_parquet(out.data / "pairs.parquet")
    (out.path("model")).mkdir()
    (out.path("metrics.jsonl")).write_text("{}\n")
    elsewhere = str(tmp_path / "models" / "sft")  # outside output_dir: recorded as given
    done = out.commit(rows={"pairs_trained": 1}, model=str(out.final / "model"),
                      metrics_file=out.final / "metrics.jsonl",
                      reference_cache=str(run / "01_generate" / "ref_logps" / "x.parquet"), base_model=elsewhere,
                      adapter=None)
    assert done["model"] == str(run / "03_dpo_train" / "model")  # the caller gets absolute paths
    raw = json.loads((run / "03_dpo_train" / "manifest.json").read_text())
    assert raw["model"] == "03_dpo_train/model" and raw["metrics_file"] == "03_dpo_train/metrics.jsonl"
    assert raw["reference_cache"] == "01_generate/ref_logps/x.parquet" and raw["input"]["dir"] == "01_generate"
    assert raw["base_model"] == elsewhere and raw["adapter"] is None
    assert str(tmp_path) not in json.dumps({k: v for k, v in raw.items() if k not in ("config", "base_model")})
    # the relative input still matches for reuse: same config, same input
    assert StageOutput(cfg, "03_dpo_train", upstream=read_manifest(run / "01_generate", "01_generate")).reusable()

    moved = tmp_path / "laptop" / "copy"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))
    m = read_manifest(moved / "03_dpo_train", "03_dpo_train")
    assert m["model"] == str(moved / "03_dpo_train" / "model") and os.path.isdir(m["model"])
    assert m["input"]["dir"] == str(moved / "01_generate") and m["base_model"] == elsewhere


def test_old_manifests_with_absolute_paths_still_read(tmp_path):
    fake_output(tmp_path, stage="03_dpo_train")
    mf = tmp_path / "03_dpo_train" / "manifest.json"
    raw = json.loads(mf.read_text())
    for k in ("relative_paths", "files"):
        raw.pop(k)
    raw["model"] = "/somewhere/else/model"
    mf.write_text(json.dumps(raw))
    assert read_manifest(tmp_path / "03_dpo_train", "03_dpo_train")["model"] == "/somewhere/else/model"

