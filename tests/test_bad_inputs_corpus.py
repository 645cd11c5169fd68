"""The bad-input corpus (tests/bad_inputs/): every case runs its stage script as a user would and must exit 2 with
exactly one `error:` line, the last thing printed, holding the expected words; no traceback; nothing that looks
complete (no manifest.json) and no file touched outside the case's own output folder. Cases that stop before Ray
are the fast tier; the few that need Ray are marked slow. docs/reliability.md's table is generated from the corpus."""
import re
import subprocess
from pathlib import Path

import pytest

from bad_inputs.cases import REPO, load_cases, prepare, runnable
from bad_inputs.table import render, replace_table

CASES = runnable(load_cases())
PARAMS = [pytest.param(name, marks=[pytest.mark.slow] if c.get("slow") else [], id=name)
          for name, c in CASES.items()]
RAY_PREFIX = re.compile(r"^\s*(\x1b\[[0-9;]*m)*\(")  # Ray workers' own log lines: `(ActorName pid=...) ...`


def snapshot(root: Path, skip: Path | None = None) -> dict[str, float]:
    return {str(p): p.lstat().st_mtime for p in root.rglob("*")
            if skip is None or not (p == skip or skip in p.parents)}


def repo_state() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "--", ".",
                           ":!.venv", ":!models", ":!data"],
                          cwd=REPO, capture_output=True, text=True).stdout


@pytest.mark.parametrize("name", PARAMS)
def test_bad_input_case(tmp_path, name):
    case = CASES[name]
    cmd = prepare(case, tmp_path)
    out = tmp_path / "out"
    before, repo_before, manifests = snapshot(tmp_path, out), repo_state(), set(out.rglob("manifest.json"))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    ours = [ln for ln in proc.stderr.splitlines() if ln.strip() and not RAY_PREFIX.match(ln)]
    assert proc.returncode == case.get("exit", 2), proc.stderr[-3000:]
    assert not any("Traceback" in ln for ln in ours + proc.stdout.splitlines()), proc.stderr[-3000:]
    errors = [ln for ln in ours if ln.startswith("error:")]
    assert len(errors) == 1 and ours[-1] == errors[0], proc.stderr[-3000:]
    expect = case["expect"] if isinstance(case["expect"], list) else [case["expect"]]
    assert all(e in errors[0] for e in expect), errors[0]
    assert set(out.rglob("manifest.json")) == manifests, "a run that failed left a complete-looking output"
    assert snapshot(tmp_path, out) == before, "files changed outside the case's output folder"
    assert repo_state() == repo_before, "files changed in the repository"


def test_every_case_is_well_formed():
    cases = load_cases()
    assert len(CASES) >= 40 and sum(bool(c.get("slow")) for c in CASES.values()) <= 5
    for name, c in cases.items():
        assert {"stage", "what", "shows"} <= set(c), name
        assert ("expect" in c) != ("covered_by" in c), name


def test_reliability_table_is_generated_from_the_corpus():
    doc = REPO / "docs" / "reliability.md"
    text = doc.read_text()
    assert replace_table(text, render(load_cases())) == text, \
        "docs/reliability.md is out of date: run python tests/bad_inputs/table.py"
