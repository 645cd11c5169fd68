"""Validation during training, the parts that need no Ray: stage 2's held-out split by prompt, the driver's eval line,
the training curves and the run summary with eval rows in metrics.jsonl. The eval loop itself runs for real in
test_dpo_stage.py (its shared `trained` run carries held-out pairs)."""
import json

import pytest

from common import schema as S
from common.config import PairingConfig
from common.errors import UserError
from common.pairing import split_valid


def pairs(prompts: int, per_prompt: int = 2) -> list[dict]:
    return [{S.PROMPT_ID: f"p{i}", S.PAIR_ID: f"p{i}-{k}"} for i in range(prompts) for k in range(per_prompt)]


def test_valid_split_holds_out_whole_prompts_deterministically():
    ps = pairs(64, 2)
    train, valid = split_valid(ps, 0.125, seed=0)
    held = {p[S.PROMPT_ID] for p in valid}
    assert len(held) == 8 and len(valid) == 16 and len(train) == 112
    assert not held & {p[S.PROMPT_ID] for p in train}  # a prompt's pairs are all on one side
    again = split_valid(list(reversed(ps)), 0.125, seed=0)[1]  # row order does not matter
    assert {p[S.PAIR_ID] for p in again} == {p[S.PAIR_ID] for p in valid}
    other = {p[S.PROMPT_ID] for p in split_valid(ps, 0.125, seed=1)[1]}
    assert other != held and len(other) == 8  # the seed picks other prompts


def test_valid_split_edges():
    ps = pairs(3, 1)
    assert split_valid(ps, 0.0, seed=0) == (ps, [])  # off by default
    assert len(split_valid(ps, 0.01, seed=0)[1]) == 1  # a non-zero share holds out at least one prompt
    assert split_valid(pairs(1, 3), 0.4, seed=0)[1] == []  # one prompt: nothing to hold out, all of it trains
    with pytest.raises(ValueError):
        PairingConfig(valid_fraction=0.5)  # half or more would leave too little to train on


def test_eval_rows_print_one_line_and_stay_out_of_the_training_summary(tmp_path, capsys):
    from common.dpo import read_train_result
    from common.plots import plot_training_curves
    from common.progress import follow_training

    train = {"epoch": 1, "total_steps": 2, "loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.01,
             "lr": 1e-4, "tokens_per_second_per_worker": 100.0, "ref_wait_seconds": 0.5, "step_seconds": 1.0}
    ev = {"epoch": 1, "eval/loss": 0.6931, "eval/rewards/accuracies": 0.0, "eval/rewards/margins": 0.0,
          "eval/rewards/chosen": 0.0, "eval/rewards/rejected": 0.0, "eval/num_pairs": 8}
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("")
    with follow_training(metrics, step0_tolerance=0.05):
        with open(metrics, "a") as f:
            for m in ({**ev, "step": 0}, {**train, "step": 1}, {**train, "step": 2, "loss": 0.6},
                      {**ev, "step": 2, "eval/loss": 0.65, "eval/rewards/accuracies": 0.75}):
                f.write(json.dumps(m) + "\n")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("[03_dpo_train] eval at step 0: loss 0.6931 acc 0.00 margin +0.0000 on 8 held-out pairs")
    assert lines[1].startswith("[03_dpo_train] epoch 1 step 1/2 loss 0.6900") and len(lines) == 4
    st = read_train_result(tmp_path, tmp_path, 4, 1).stats
    assert st["first_metrics"]["step"] == 1 and st["final_metrics"]["loss"] == 0.6 and st["steps"] == 2
    assert st["evaluations"] == 2 and st["first_eval"]["step"] == 0 and st["final_eval"]["eval/loss"] == 0.65
    plot_training_curves(metrics, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_valid_path_that_does_not_exist_is_one_line(tmp_path):
    from common.config import REPO, load_config
    from common.dpo import load_valid_pairs

    cfg = load_config("03_dpo_train", str(REPO / "configs/quickstart/03_dpo_train.yaml"),
                      [f"valid_path={tmp_path}/nowhere.jsonl"])
    with pytest.raises(UserError, match="valid_path .*nowhere.jsonl not found"):
        load_valid_pairs(cfg, None)
    cfg = load_config("03_dpo_train", str(REPO / "configs/quickstart/03_dpo_train.yaml"), [])
    assert load_valid_pairs(cfg, None) is None and load_valid_pairs(cfg, {"dir": "x", "valid_pairs": None}) is None
