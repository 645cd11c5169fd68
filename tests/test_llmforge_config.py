"""An LLMForge preference-tuning config runs here as LLMForge meant it: every key accepted with its meaning (deepspeed's
ZeRO stage -> FSDP sharding, flash_attention_2 -> attn_implementation, GPUs `auto`), or refused in one line naming
the replacement. docs/migrating-from-llmforge.md is the table these tests hold to."""
import json
import subprocess
import sys

import pytest

from common.config import LLMFORGE_REFUSED, load_config
from common.dpo import plan, plan_notes, resolve_gpus
from common.errors import UserError
from conftest import REPO, one_line_error

LLMFORGE = REPO / "configs/gpu/llmforge_dpo.yaml"
QUICKSTART = REPO / "configs/quickstart/03_dpo_train.yaml"
ZERO3 = "configs/gpu/deepspeed_configs/zero_3.json"


def dry_run(config, *sets, timeout=120):
    cmd = [sys.executable, str(REPO / "03_dpo_train/train.py"), "--config", str(config), "--dry-run"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def deepspeed_json(tmp_path, stage):
    path = tmp_path / f"zero_{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "train_batch_size": "auto"}))
    return path


# ---------------------------------------------------------------- the shipped LLMForge config
def test_llmforge_config_validates_unchanged_with_llmforge_meaning():
    cfg = load_config("03_dpo_train", str(LLMFORGE))
    assert (cfg.strategy, cfg.fsdp_sharding_strategy) == ("fsdp", "FULL_SHARD")  # deepspeed ZeRO-3
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.attn_implementation == "flash_attention_2"  # flash_attention_2: True
    assert cfg.gradient_checkpointing is True  # no_gradient_checkpoint: False
    assert cfg.use_gpu == "auto" and cfg.preference_tuning_config.logprob_processor_scaling_config.num_gpus == "auto"
    assert cfg.lora_config.model_dump()["init_lora_weights"] is True  # any peft field, passed as is
    assert cfg.learning_rate == 5e-6 and cfg.num_devices == 6


def test_llmforge_dry_run_plans_a_gpu_per_trainer_and_reference_actor_and_prints_the_mapping():
    proc = dry_run(LLMFORGE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    trainer = next(ln for ln in lines if "DPO train worker" in ln)
    ref = next(ln for ln in lines if "reference log-prob actor" in ln)
    assert "6 x" in trainer and "GPU: 1," in trainer and "fsdp full shard" in trainer
    assert "2 x" in ref and "GPU: 1," in ref
    assert f"deepspeed ZeRO-3 ({ZERO3}) -> FSDP full shard (FULL_SHARD)" in proc.stdout
    assert "attention: flash_attention_2" in proc.stdout
    assert "GPUs auto: 1 GPU per trainer / per reference actor if the cluster has GPUs, else CPU" in proc.stdout


# ---------------------------------------------------------------- deepspeed -> FSDP
@pytest.mark.parametrize("stage,strategy,sharding", [(3, "fsdp", "FULL_SHARD"), (2, "fsdp", "SHARD_GRAD_OP"),
                                                     (1, "fsdp", "SHARD_GRAD_OP"), (0, "ddp", "FULL_SHARD")])
def test_deepspeed_zero_stage_maps_to_fsdp_sharding(tmp_path, stage, strategy, sharding):
    path = deepspeed_json(tmp_path, stage)
    cfg = load_config("03_dpo_train", str(QUICKSTART), [f"deepspeed={{config_path: {path}}}"])
    assert (cfg.strategy, cfg.fsdp_sharding_strategy, cfg.deepspeed.zero_stage) == (strategy, sharding, stage)


def test_zero2_is_printed_in_the_dry_run(tmp_path):
    path = deepspeed_json(tmp_path, 2)
    proc = dry_run(QUICKSTART, f"deepspeed={{config_path: {path}}}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"deepspeed ZeRO-2 ({path}) -> FSDP shard grad+optimizer (SHARD_GRAD_OP)" in proc.stdout
    assert "DPO train worker (fsdp shard grad+optimizer)" in proc.stdout


@pytest.mark.parametrize("case", ["missing", "not_json", "bad_stage"])
def test_unreadable_deepspeed_config_is_one_line(tmp_path, case):
    path = tmp_path / "ds.json"
    if case == "not_json":
        path.write_text("{stage: 3")
    elif case == "bad_stage":
        path.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    line = one_line_error(dry_run(QUICKSTART, f"deepspeed={{config_path: {path}}}", f"output_dir={tmp_path}/out"))
    assert "'deepspeed'" in line and str(path) in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- other LLMForge spellings
def test_flash_attention_2_sets_the_attention_implementation():
    on = load_config("03_dpo_train", str(QUICKSTART), ["flash_attention_2=true"])
    off = load_config("03_dpo_train", str(QUICKSTART), ["flash_attention_2=false"])
    assert on.attn_implementation == "flash_attention_2"
    assert off.attn_implementation is None  # transformers' default (sdpa), what the CPU quickstart uses
    with pytest.raises(UserError, match="'flash_attention_2' .* and 'attn_implementation' disagree"):
        load_config("03_dpo_train", str(QUICKSTART), ["flash_attention_2=true", "attn_implementation=eager"])


def test_llmforge_renamed_keys_keep_their_meaning(tmp_path):
    config = tmp_path / "llmforge.yaml"
    config.write_text("no_gradient_checkpoint: true\nnum_warmup_steps: 7\ncheckpoint_every_n_epochs: 1\n"
                      "trainer_resources: {}\n")
    cfg = load_config("03_dpo_train", str(config))
    assert cfg.gradient_checkpointing is False and cfg.warmup_steps == 7
    with pytest.raises(UserError, match="'num_warmup_steps' .* and 'warmup_steps' disagree"):
        load_config("03_dpo_train", str(config), ["warmup_steps=3"])


@pytest.mark.parametrize("key", sorted(LLMFORGE_REFUSED))
def test_llmforge_keys_without_a_counterpart_are_refused_naming_the_replacement(key):
    with pytest.raises(UserError, match=f"'{key}' \\(LLMForge key\\) is not supported: "):
        load_config("03_dpo_train", str(QUICKSTART), [f"{key}={{}}"])


@pytest.mark.parametrize("override,expect", [
    ("task=causal_lm", "'task': 'causal_lm' is not supported: LLMForge's other tasks"),
    ("padding=max_length", "'padding': 'max_length' is not supported: batches are padded to their longest row"),
    ("generation_config={prompt_format: {}}", "'generation_config' (LLMForge key) is not supported"),
    ("checkpoint_every_n_epochs=2", "use checkpoint_every_n_steps"),
    ("flash_atention_2=true", "unknown key 'flash_atention_2' (did you mean 'flash_attention_2'?)"),
])
def test_bad_llmforge_input_is_one_error_line_exit_2(tmp_path, override, expect):
    line = one_line_error(dry_run(LLMFORGE, override, f"output_dir={tmp_path}/out"))
    assert line.startswith("error: ") and expect in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- GPUs auto
def test_gpus_auto_resolve_to_one_per_trainer_and_reference_actor_or_cpu():
    cfg = load_config("03_dpo_train", str(LLMFORGE))
    gpu, said = resolve_gpus(cfg, 8)
    assert gpu.use_gpu is True and gpu.preference_tuning_config.logprob_processor_scaling_config.num_gpus == 1.0
    assert "8 GPU(s) -> 1 GPU per trainer / per reference actor" in said
    cpu, said = resolve_gpus(cfg, 0)
    assert cpu.use_gpu is False and cpu.preference_tuning_config.logprob_processor_scaling_config.num_gpus == 0.0
    assert all("GPU" not in a.resources for a in plan(cpu)) and "CPU trainers" in said
    assert not any("GPUs auto" in n for n in plan_notes(cpu))


def test_quickstart_gpus_are_fixed_so_nothing_changes_on_this_machine():
    cfg = load_config("03_dpo_train", str(QUICKSTART))
    assert resolve_gpus(cfg, 4) == (cfg, None)  # use_gpu: false, num_gpus: 0 written out: never auto
    assert [n for n in plan_notes(cfg) if "auto" in n or "deepspeed" in n] == []  # only the pool estimate


@pytest.mark.slow
def test_gpus_auto_against_a_ray_cluster_with_and_without_gpus():
    """Ray lets a node declare GPUs it does not have: resolution reads what the running cluster says."""
    import ray

    cfg = load_config("03_dpo_train", str(LLMFORGE))
    for declared, use_gpu in ((2, True), (0, False)):
        ray.init(num_cpus=1, num_gpus=declared, include_dashboard=False)
        try:
            resolved, _ = resolve_gpus(cfg, ray.cluster_resources().get("GPU", 0))
        finally:
            ray.shutdown()
        assert resolved.use_gpu is use_gpu
        assert resolved.preference_tuning_config.logprob_processor_scaling_config.num_gpus == float(use_gpu)
