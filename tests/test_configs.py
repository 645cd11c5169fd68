"""Every shipped config validates (GPU ones by --dry-run, no GPU needed), and bad configs fail as one line, exit 2,
with nothing written."""
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import STAGES, load_config
from common.errors import UserError
from conftest import REPO, one_line_error

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


BAD = {  # case -> (stage, --set overrides or YAML text, what the one line must say)
    "unknown_key_suggests": ("01_generate", ["sampling.tempreature=0.5"], "did you mean 'sampling.temperature'"),
    "unknown_top_level": ("01_generate", ["modle.path=x"], "unknown key 'modle'"),
    "wrong_type": ("01_generate", ["sampling.n=many"], "'sampling.n'"),
    "zero_size": ("01_generate", ["engine.batch_size=0"], "greater than 0"),
    "negative": ("01_generate", ["sampling.max_tokens=-5"], "greater than 0"),
    "greedy_with_n": ("01_generate", ["sampling.temperature=0", "sampling.n=4"], "identical candidates"),
    "template_without_text": ("01_generate", ["prompt.template=Summarize"], "{text}"),
    "missing_model": ("01_generate", ["model.path=models/nope"], "model models/nope not found"),
    "missing_data": ("01_generate", ["data.path=data/nope.jsonl"], "data.path data/nope.jsonl not found"),
    "missing_column": ("01_generate", ["data.columns={text: body}"], "data.columns maps text -> 'body'"),
    "llmforge_typo": ("03_dpo_train", ["preference_tuning_config.logprob_processor_scaling_config.concurency=2"],
                      "did you mean 'preference_tuning_config.logprob_processor_scaling_config.concurrency'"),
    "bad_loss": ("03_dpo_train", ["preference_tuning_config.loss_type=kto"], "loss_type"),
    "prompt_longer_than_context": ("03_dpo_train", ["max_prompt_length=900"], "max_prompt_length"),
    "bad_set_syntax": ("01_generate", ["sampling.n"], "expected key.sub=value"),
    "too_many_cpus": ("01_generate", ["engine.num_cpus=64"], "needs 64.25 CPUs"),
    "zero_ray_cpus": ("01_generate", ["ray.num_cpus=0"], "'ray.num_cpus': Input should be greater than 0"),
    "empty_set_value": ("03_dpo_train", ["train_path="], "no value for 'train_path'"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_one_line_exit_2_nothing_written(tmp_path, case):
    stage, sets, expect = BAD[case]
    cmd = [sys.executable, str(REPO / SCRIPTS[stage]), "--config", str(REPO / f"configs/quickstart/{stage}.yaml"),
           "--set", f"output_dir={tmp_path}/out"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expect in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_yaml_syntax_error_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling:\n  n: [1, 2\n")
    with pytest.raises(UserError, match=r"bad.yaml.*not valid YAML"):
        load_config("01_generate", str(bad))
    with pytest.raises(UserError, match="not found"):
        load_config("01_generate", str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("case", ["not_utf8", "a_folder"])
def test_config_not_utf8_or_a_folder_is_one_line(tmp_path, case):
    if case == "not_utf8":
        config = tmp_path / "latin1.yaml"
        config.write_bytes("output_dir: outputs/x\n# r\u00e9sum\u00e9\n".encode("latin-1"))
        expect = f"{config}: line 2: byte 0xe9 is not UTF-8"
    else:
        config, expect = REPO / "configs/quickstart", "configs/quickstart is a folder, not a file"
    proc = subprocess.run([sys.executable, str(REPO / SCRIPTS["02_judge"]), "--config", str(config), "--set",
                           f"output_dir={tmp_path}/out"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert expect in one_line_error(proc)
    assert not (tmp_path / "out").exists()


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
