"""The reference-pool sizing estimate printed with stage 3's plan (common.capacity)."""
import pytest

from common.capacity import describe, pool_balance

A10G, A100 = {"accelerator_type:A10G": 0.001}, {"accelerator_type:A100": 0.001}


def gpu(trainers, trainer_res, actors, actor_res, lora=True, gc=True):
    return pool_balance(gpu=True, trainers=trainers, worker_resources=trainer_res, trainer_cpus=8, actors=actors,
                        actor_resources=actor_res, actor_cpus=4, actor_gpus=1, lora=lora,
                        gradient_checkpointing=gc)


def test_four_a10g_actors_feed_a_third_of_eight_a100_trainers_and_twelve_would_balance():
    b = gpu(8, A100, 4, A10G)  # LoRA + gradient checkpointing: a step ~ 3 reference forwards
    assert b.supply_over_demand == pytest.approx(4 * 70 * 6 / (2 * 8 * 312))
    assert b.balanced_concurrency == 12 and gpu(8, A100, 12, A10G).supply_over_demand >= 1
    assert describe(b, 4, 8).startswith("WARNING:") and "concurrency: 12" in describe(b, 4, 8)


def test_the_anyscale_recipes_ratio_is_balanced():
    """Anyscale's recipe paired 4 A10G reference actors with 12 A10G trainers (LoRA, gradient checkpointing)."""
    b = gpu(12, A10G, 4, A10G)
    assert b.supply_over_demand == pytest.approx(1.0) and b.balanced_concurrency == 4
    assert not describe(b, 4, 12).startswith("WARNING")


def test_full_fine_tuning_steps_are_slower_so_fewer_actors_keep_up():
    assert gpu(8, A100, 4, A10G, lora=False).balanced_concurrency == 9  # a step ~ 4 reference forwards


def test_cpu_estimate_from_the_bundles_and_unknown_gpus_give_none():
    cpu = pool_balance(gpu=False, trainers=1, worker_resources=A100, trainer_cpus=1, actors=1,
                       actor_resources=A10G, actor_cpus=0.5, actor_gpus=0, lora=True, gradient_checkpointing=False)
    assert cpu.supply_over_demand == pytest.approx(1.0)
    assert gpu(8, {"accelerator_type:TPU-v9": 1}, 4, A10G) is None


def test_gpu_projection_of_the_shipped_config_prints_the_three_setups():
    """benchmarks/gpu_projection.py on configs/gpu/03_dpo_train.yaml (8 A100 LoRA trainers with gradient
    checkpointing, 12 A10G reference actors), 10k pairs of 2.2k tokens, 40% of nominal TFLOPS."""
    from benchmarks.gpu_projection import main

    text = main(["--config", "configs/gpu/03_dpo_train.yaml", "--pairs", "10000", "--tokens-per-pair", "2200",
                 "--params", "7.24e9", "--mfu", "0.4"])
    assert "reference forward (2N a token) 3.19e+13" in text  # 2 x 7.24e9 x 2200 = 3.1856e13 FLOPs a pair
    assert "policy step (LoRA + gradient checkpointing: 6N a token) 9.56e+13" in text
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and "setup" not in line]
    assert rows == ["| ours (reference pool, epoch 1 only)", "| TRL inline reference", "| TRL precompute_ref_log_probs"]
    # an epoch of policy steps: 10000 x 9.5568e13 FLOPs / (8 x 312e12 x 0.4 FLOP/s) = 957 s; the pool keeps up
    # (supply 12 x 70 x 6 / (2 x 8 x 312) = 1.01), so epoch 1 takes as long; TRL inline pays 8N/6N of it every epoch
    assert "| 8 A100 + 12 A10G | 16.0 min | 16.0 min | 47.9 min |" in text
    assert "| 8 A100 | 21.3 min | 21.3 min | 63.8 min |" in text
    assert "supply / trainer demand: 1.01" in text


def test_recipe_sweep_refuses_the_test_split_before_running_anything(tmp_path):
    """benchmarks/sweep_recipe.py chooses knobs: pointed at ACLSum's test split it stops at once, with the why."""
    import subprocess
    import sys

    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "benchmarks/sweep_recipe.py", "--out", str(out), "--split",
                        "data/aclsum/test.jsonl"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "test split" in r.stderr and "val.jsonl" in r.stderr
    assert not out.exists()  # nothing was started or written
