"""Every shipped config validates (GPU ones by --dry-run, no GPU needed). Bad configs run as a user would (one line,
exit 2, nothing written) are in the corpus: tests/bad_inputs/any-*.yaml, run by tests/test_bad_inputs_corpus.py."""
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import STAGES, load_config
from common.errors import UserError
from conftest import REPO

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
SCRIPTS = {"01_generate": "01_generate/generate.py", "02_judge": "02_judge/judge.py",
           "03_dpo_train": "03_dpo_train/train.py", "04_evaluate": "04_evaluate/evaluate.py"}


def stage_of(path: Path) -> str:
    return "03_dpo_train" if path.stem == "llmforge_dpo" else path.stem  # an LLMForge config is stage 3's


def test_every_stage_has_a_quickstart_and_a_gpu_config():
    names = {(p.parent.name, p.stem) for p in CONFIGS}
    for stage in STAGES:
        if (REPO / SCRIPTS[stage]).exists():
            assert ("quickstart", stage) in names and ("gpu", stage) in names, stage


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_validates(path):
    cfg = load_config(stage_of(path), str(path))
    assert cfg.output_dir


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name == "gpu"], ids=lambda p: p.name)
def test_gpu_config_dry_run_prints_the_resource_plan(path):
    script = REPO / SCRIPTS[stage_of(path)]
    if not script.exists():
        pytest.skip(f"{script.name} not built yet")
    proc = subprocess.run([sys.executable, str(script), "--config", str(path), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resource plan on the cluster" in proc.stdout and "GPU: " in proc.stdout


def test_quickstart_example_config_comments_every_key():
    """The example configs are the documentation: every key line carries a trailing comment or a comment above."""
    for path in sorted((REPO / "configs" / "quickstart").glob("*.yaml")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            if not s or s.startswith("#") or s.startswith("- ") or ":" not in s:
                continue
            commented = "#" in line or lines[i - 1].strip().startswith("#") or s.endswith(":")
            assert commented, f"{path.name}:{i + 1}: `{s}` has no comment"


def test_yaml_syntax_error_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling:\n  n: [1, 2\n")
    with pytest.raises(UserError, match=r"bad.yaml.*not valid YAML"):
        load_config("01_generate", str(bad))
    with pytest.raises(UserError, match="not found"):
        load_config("01_generate", str(tmp_path / "nope.yaml"))


def test_empty_train_path_in_yaml_is_an_error_not_a_fallback(tmp_path):
    config = tmp_path / "dpo.yaml"
    config.write_text('train_path: ""\n')
    with pytest.raises(UserError, match="'train_path': String should have at least 1 character"):
        load_config("03_dpo_train", str(config))


def test_overrides_and_interpolation():
    cfg = load_config("03_dpo_train", str(REPO / "configs/quickstart/03_dpo_train.yaml"),
                      ["output_dir=/tmp/elsewhere", "preference_tuning_config.beta=0.05"])
    assert cfg.input_dir == "/tmp/elsewhere/02_judge"  # ${output_dir} follows the override
    assert cfg.preference_tuning_config.beta == 0.05


def test_llmforge_deepspeed_key_maps_to_fsdp():
    cfg = load_config("03_dpo_train", str(REPO / "configs/quickstart/03_dpo_train.yaml"),
                      ["deepspeed={config_path: configs/gpu/deepspeed_configs/zero_3.json}"])
    assert cfg.strategy == "fsdp"
