"""Stage 3 for real: the embedded model, Ray Train + the Ray Data reference actor pool, on 2 CPU cores.

Pairs are real ACLSum text: the chosen response is the first sentence of the human summary, the rejected one the
whole summary (the recipe's "shorter and still faithful" preference). Nothing is mocked; there is no GPU here, so
the A10G/A100 asks are the custom resources the local Ray declares (common.ray_setup).
"""
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from common.io import read_manifest
from conftest import REPO, one_line_error, run_stage

pytestmark = pytest.mark.slow  # starts Ray / vLLM / stage subprocesses: not in `scripts/test.sh --fast`

CONFIG = REPO / "configs/quickstart/03_dpo_train.yaml"
SCRIPT = "03_dpo_train/train.py"


def write_pairs(path: Path, n: int, start: int = 0, **overrides) -> Path:
    rows = [json.loads(line) for line in open(REPO / "data/aclsum/test.jsonl")][start:start + n]
    with open(path, "w") as f:
        for r in rows:
            pair = {"prompt": [{"role": "user", "content": "Summarize in one sentence.\n\n" + r["summary"]}],
                    "chosen": r["summary"].split(". ")[0].rstrip(".") + ".", "rejected": r["summary"]}
            f.write(json.dumps({**pair, **overrides}) + "\n")
    return path


def manifest(out: Path) -> dict:
    return read_manifest(out / "03_dpo_train", "03_dpo_train")  # its paths resolved (written relative to out)


def metric_rows(out: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl as (training steps, evaluations on the held-out pairs)."""
    rows = [json.loads(line) for line in open(out / "03_dpo_train" / "metrics.jsonl")]
    return [r for r in rows if "eval/loss" not in r], [r for r in rows if "eval/loss" in r]


# Reference batch (3 pairs) != trainer batch (4 pairs), as in the quickstart (4 vs 2). Eval batch 3: two forwards
# for the 4 held-out pairs, one of them partial.
TRAINED_SETS = ["num_epochs=4", "learning_rate=1e-3", "warmup_steps=0", "lr_scheduler_type=constant",
                "train_batch_size_per_device=4",
                "preference_tuning_config.logprob_processor_scaling_config.batch_size=3",
                "eval_steps=2", "eval_batch_size_per_device=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Overfit 4 fixed pairs (a fifth, chosen == rejected, is dropped) for 4 epochs (one batch a step): loss must
    fall, accuracy rise. The reference actor scores 3 pairs per call, the trainer 4: step 0 must agree all the same.
    4 other pairs (other abstracts) are held out with `valid_path` and evaluated at steps 0, 2 and 4."""
    tmp = tmp_path_factory.mktemp("dpo")
    pairs = write_pairs(tmp / "pairs.jsonl", 4)
    with open(pairs, "a") as f:  # chosen == rejected: nothing to learn, dropped and counted
        f.write(json.dumps({"prompt": "Say it.", "chosen": "The same.", "rejected": "The same."}) + "\n")
    valid = write_pairs(tmp / "valid.jsonl", 4, start=4)
    proc = run_stage(SCRIPT, CONFIG, f"train_path={pairs}", f"output_dir={tmp}", f"valid_path={valid}",
                     *TRAINED_SETS, "report_to=[tensorboard, mlflow]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, pairs, proc, valid


def test_a_pair_with_chosen_equal_to_rejected_is_dropped_and_counted(trained):
    m = manifest(trained[0])
    assert m["stats"]["pairs_in"] == 5 and m["stats"]["dropped"] == {"identical_responses": 1}
    assert m["rows"]["pairs_trained"] == 4 and "1 dropped: {'identical_responses': 1}" in trained[2].stdout


def test_step0_is_ln2_and_policy_matches_reference(trained):
    m = manifest(trained[0])["stats"]
    assert math.isclose(m["first_metrics"]["loss"], math.log(2), abs_tol=1e-3)
    # same weights, tokens and dtype; the reference's batches differ from the trainer's, which must not matter
    assert m["step0_max_abs_logp_diff"] < 1e-3


def test_overfitting_a_fixed_batch_lowers_loss_and_raises_accuracy(trained):
    rows = metric_rows(trained[0])[0]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05
    assert rows[-1]["rewards/accuracies"] >= 0.75 > rows[0]["rewards/accuracies"]
    assert rows[-1]["rewards/margins"] > 0


def test_tensorboard_and_mlflow_runs_hold_the_metrics_jsonl(trained, monkeypatch):
    """report_to=[tensorboard, mlflow]: rank 0's runs moved into the output, each holding metrics.jsonl's rows."""
    from test_tracking import assert_runs_match_metrics

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked
    out = trained[0] / "03_dpo_train"
    assert {"runs", "mlruns"} <= set(manifest(trained[0])["files"]) and "mlflow ui" in trained[2].stdout
    assert_runs_match_metrics(out)


def test_trainer_takes_the_reference_core_once_the_pass_is_over(trained):
    """The quickstart's `cpu_threads_after_reference: 2`: step 1 trains beside the reference actor on one thread;
    epochs 2-4 reuse the first epoch's reference log-probs, so no pool runs and the trainer takes both cores."""
    rows = metric_rows(trained[0])[0]
    assert [r["torch_threads"] for r in rows] == [1, 2, 2, 2]


def test_reference_ran_in_its_own_actor_with_the_requested_resources(trained):
    m = manifest(trained[0])["stats"]
    actors, trainers = m["reference_actors"], m["trainer_pids"]
    assert actors and trainers
    assert not {a["pid"] for a in actors} & set(trainers) and os.getpid() not in trainers
    for a in actors:  # logprob_processor_scaling_config: num_cpus 0.5, custom_resources accelerator_type:A10G
        assert a["resources"]["CPU"] == 0.5 and a["resources"]["accelerator_type:A10G"] == pytest.approx(0.001)
    assert all(set(m["final_metrics"]["ref_pids"]) <= {a["pid"] for a in actors} for _ in [0])


def test_checkpoint_is_a_plain_hf_model_that_moved_away_from_sft(trained, model_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = trained[0] / "03_dpo_train"
    dpo = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    sft = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    diffs = [(a - b).abs().max().item() for a, b in zip(dpo.parameters(), sft.parameters())]
    assert max(diffs) > 0 and (out / "adapter" / "adapter_config.json").exists()
    assert (out / "training_curves.png").stat().st_size > 1000
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["eos_token_id"] == 2


def test_eval_loss_at_step_0_is_ln2_on_held_out_pairs(trained):
    """Before any update the policy is the reference on pairs it never trains on too; after 4 steps of overfitting
    other pairs, the held-out loss has moved."""
    m = manifest(trained[0])["stats"]
    first, last = m["first_eval"], m["final_eval"]
    assert first["step"] == 0 and first["eval/num_pairs"] == 4 == m["valid_pairs"]
    assert math.isclose(first["eval/loss"], math.log(2), abs_tol=1e-3)
    assert first["eval/rewards/margins"] == pytest.approx(0, abs=1e-2)
    assert last["eval/loss"] != pytest.approx(first["eval/loss"], abs=1e-4)
    assert "eval at step 0: loss 0.693" in trained[2].stdout and "Eval on 4 held-out pairs" in trained[2].stdout


def test_eval_rows_every_eval_steps_and_at_the_end(trained):
    train, evals = metric_rows(trained[0])
    assert [r["step"] for r in evals] == [0, 2, 4] and train[-1]["step"] == 4
    for r in evals:
        assert {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/rewards/chosen",
                "eval/rewards/rejected"} <= set(r)
        assert "loss" not in r  # TRL's names: an eval row never passes for a training step


def test_held_out_reference_logps_come_from_the_pool_and_are_cached(trained):
    m = manifest(trained[0])
    actors = {a["pid"] for a in m["stats"]["reference_actors"]}
    assert m["stats"]["valid_reference_cache"] == "computed"
    pids = m["stats"]["first_eval"]["eval/ref_pids"]
    assert pids and set(pids) <= actors  # a reference actor of this run, not the cache (-1)
    cache = pd.read_parquet(m["valid_reference_cache"])
    assert len(cache) == 4 and cache["pair_id"].is_unique
    assert m["valid_reference_cache"] != m["reference_cache"]


def test_rerun_reuses_output_then_the_reference_cache(trained):
    tmp, pairs, _, valid = trained
    sets = [f"train_path={pairs}", f"output_dir={tmp}", f"valid_path={valid}", *TRAINED_SETS]
    again = run_stage(SCRIPT, CONFIG, *sets)
    assert again.returncode == 0 and "reusing the complete output" in again.stdout
    forced = run_stage(SCRIPT, CONFIG, *sets[:3], "num_epochs=1", "train_batch_size_per_device=4", force=True)
    assert forced.returncode == 0, forced.stderr[-3000:]
    m = manifest(tmp)["stats"]
    assert m["reference_cache"] == "hit" and m["reference_actors"] == []  # no reference pool at all
    assert math.isclose(m["first_metrics"]["loss"], math.log(2), abs_tol=1e-3)  # cached logps match the policy
    # the held-out pairs too: from their cache, at step 0 and at the end (step 1)
    assert m["valid_reference_cache"] == "hit" and m["first_eval"]["eval/ref_pids"] == [-1]
    assert math.isclose(m["first_eval"]["eval/loss"], math.log(2), abs_tol=1e-3) and m["final_eval"]["step"] == 1


def test_killed_reference_actor_is_replaced_and_every_pair_seen_once(tmp_path):
    """SIGKILL the reference actor mid-epoch: Ray Data restarts it and retries its batches."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", 12)
    work = tmp_path / ".03_dpo_train.work" / "reference_actors"
    killed = []

    def kill_first_actor():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            files = list(work.glob("*.json")) if work.exists() else []
            if files:
                time.sleep(2)  # let it finish a batch or two first
                pid = json.loads(files[0].read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.2)

    t = threading.Thread(target=kill_first_actor, daemon=True)
    t.start()
    proc = run_stage(SCRIPT, CONFIG, f"train_path={pairs}", f"output_dir={tmp_path}", "num_epochs=1",
                     "preference_tuning_config.logprob_processor_scaling_config.batch_size=1")
    t.join(timeout=5)
    assert killed, "the reference actor never started"
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = manifest(tmp_path)
    assert m["rows"]["pairs_trained"] == 12
    assert len(m["stats"]["reference_actors"]) >= 2  # the killed one and its replacement
    cache = pd.read_parquet(m["reference_cache"])
    assert len(cache) == 12 and cache["pair_id"].is_unique  # every pair exactly once


def test_non_finite_loss_stops_with_step_and_pairs_named(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    proc = run_stage(SCRIPT, CONFIG, f"train_path={pairs}", f"output_dir={tmp_path}", "num_epochs=4",
                     "learning_rate=1e38", "train_batch_size_per_device=2")  # a typo of 1e-5
    line = one_line_error(proc)
    assert "non-finite loss at step" in line and "pairs" in line
    assert not (tmp_path / "03_dpo_train").exists()


def test_policy_trains_in_train_mode_without_dropout_and_checkpoints_activations_on_request(model_path):
    """from_pretrained gives eval mode, where HF silently skips gradient checkpointing; dropout off is TRL's
    default (it would make policy and reference disagree on the same pair)."""
    import torch

    from common.config import load_config
    from common.train_loop import build_model

    sets = ["train_path=x", "gradient_checkpointing=true", "lora_config.lora_dropout=0.1"]
    model = build_model(load_config("03_dpo_train", str(CONFIG), sets), torch.bfloat16)
    assert model.training and model.is_gradient_checkpointing
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    ids = torch.tensor([[1, 9690, 198, 2]])
    model(ids).logits.float().sum().backward()  # checkpointed backward runs with LoRA's frozen embeddings
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
    plain = build_model(load_config("03_dpo_train", str(CONFIG), ["train_path=x"]), torch.bfloat16)
    assert plain.training and not plain.is_gradient_checkpointing


def test_lora_config_reaches_peft_as_is_and_a_typo_names_the_closest_key():
    """`lora_config` is peft's LoraConfig: a key we do not list (use_rslora) is passed through unchanged; a key peft
    does not know is one line naming the closest one."""
    import peft

    from common.config import load_config
    from common.errors import UserError

    cfg = load_config("03_dpo_train", str(CONFIG), ["lora_config.use_rslora=true", "lora_config.r=4"])
    lc = peft.LoraConfig(**cfg.lora_config.model_dump())
    assert lc.use_rslora is True and lc.r == 4 and lc.lora_alpha == 16
    with pytest.raises(UserError, match=r"unknown key 'use_rslorra' \(did you mean 'lora_config.use_rslora'\?\)"):
        load_config("03_dpo_train", str(CONFIG), ["lora_config.use_rslorra=true"])
