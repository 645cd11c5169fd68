"""The bad-input corpus: one YAML file per case (this folder). A case names the stage, its `--set` overrides or
config, the small input files the run needs (written into a fresh folder) and the substring its one `error:` line
must hold; `shows` and `what` are its row in docs/reliability.md. A case with `covered_by` instead is tested elsewhere
(it needs a real earlier stage or a training run) and only listed in the table.

Keys: stage, what, shows, expect (a substring, or a list of them), exit (default 2), slow (starts Ray: the full
run only), config (default configs/quickstart/<stage>.yaml), set, args, files ({relative path: text}), files_latin1,
dirs, model_copy ({config: text, weights: bool}: the embedded model linked into {tmp}/model), setup (stage_2 or
stages_2_3: complete fake 02_judge (and 03_dpo_train) outputs in {out}), also (other tests), covered_by.
Placeholders in config/set/args: {tmp} (the case's folder), {out} (its output_dir), {repo}.
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SCRIPTS = {"01_generate": "01_generate/generate.py", "02_judge": "02_judge/judge.py",
           "03_dpo_train": "03_dpo_train/train.py", "04_evaluate": "04_evaluate/evaluate.py"}
MODEL = REPO / "models" / "smollm2-135m-instruct"


def load_cases() -> dict[str, dict]:
    """By name, the `any-` cases (every stage) first."""
    paths = sorted(HERE.glob("*.yaml"), key=lambda p: (not p.stem.startswith("any-"), p.stem))
    return {p.stem: yaml.safe_load(p.read_text(encoding="utf-8")) for p in paths}


def runnable(cases: dict[str, dict]) -> dict[str, dict]:
    return {name: c for name, c in cases.items() if "covered_by" not in c}


def fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{out}", str(tmp / "out")).replace("{repo}", str(REPO))


def prepare(case: dict, tmp: Path) -> list[str]:
    """Write the case's inputs under `tmp`; return the command that runs it."""
    for d in case.get("dirs", []):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    for enc, files in (("utf-8", case.get("files", {})), ("latin-1", case.get("files_latin1", {}))):
        for rel, text in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(text.encode(enc))
    if "model_copy" in case:
        _model_copy(tmp / "model", **case["model_copy"])
    if case.get("setup"):
        _fake_stages(tmp / "out", with_stage_3=case["setup"] == "stages_2_3")
    config = fill(case.get("config", f"configs/quickstart/{case['stage']}.yaml"), tmp)
    cmd = [sys.executable, str(REPO / SCRIPTS[case["stage"]]), "--config", config]
    sets = [fill(s, tmp) for s in case.get("set", [])]
    if not any(s.startswith("output_dir=") for s in sets):
        sets.insert(0, f"output_dir={tmp / 'out'}")
    for s in sets:
        cmd += ["--set", s]
    return cmd + [fill(a, tmp) for a in case.get("args", [])]


def _model_copy(folder: Path, config: str | None = None, weights: bool = True) -> None:
    """The embedded model's files linked into a folder of its own, with `config` as its config.json."""
    folder.mkdir()
    for f in MODEL.iterdir():
        if f.name == "config.json" and config is not None:
            (folder / f.name).write_text(config)
        elif weights or f.suffix != ".safetensors":
            (folder / f.name).symlink_to(f)


def _fake_stages(run_dir: Path, with_stage_3: bool) -> None:
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from test_evaluate_stage import fake_dpo_stage, fake_judge_stage

    fake_judge_stage(run_dir)
    if with_stage_3:
        fake_dpo_stage(run_dir, str(MODEL))
