"""TRL's three preference formats read as stage 3 reads them (no Ray): standard (prompt/chosen/rejected strings),
conversational (lists of messages) and implicit-prompt (chosen and rejected whole conversations, the prompt their
shared start, as trl.data_utils.extract_prompt splits them)."""
import json

import pandas as pd
import pytest

from common.data import read_table
from common.pairs import _rows
from common.errors import UserError


def U(t):
    return {"role": "user", "content": t}


def A(t):
    return {"role": "assistant", "content": t}


def rows_of(records, tmp_path, suffix=".jsonl"):
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        pd.DataFrame(records).to_parquet(path)
    return _rows(read_table(path, "train_path"), "pairs", "nothing")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_the_three_formats_read_the_same(tmp_path, suffix):
    from trl.data_utils import extract_prompt

    sys_ = {"role": "system", "content": "Be brief."}
    implicit = {"chosen": [sys_, U("Sky?"), A("Blue.")], "rejected": [sys_, U("Sky?"), A("Green.")]}
    standard = {"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."}
    conversational = {"prompt": [sys_, U("Sky?")], "chosen": [A("Blue.")], "rejected": [A("Green.")]}
    (imp,) = rows_of([implicit], tmp_path, suffix)
    assert {k: imp[k] for k in ("prompt", "chosen", "rejected")} == extract_prompt(implicit)
    (conv,) = rows_of([conversational], tmp_path, suffix)
    assert conv == imp  # same messages, same pair id
    (std,) = rows_of([standard], tmp_path, suffix)
    assert std["prompt"] == [U("Sky?")] and std["chosen"] == [A("Blue.")]


def test_multi_turn_implicit_prompt_keeps_the_whole_shared_history(tmp_path):
    talk = [U("Hi."), A("Hello."), U("Sky?")]
    (row,) = rows_of([{"chosen": talk + [A("Blue.")], "rejected": talk + [A("Green.")], "pair_id": None}], tmp_path)
    assert row["prompt"] == talk and row["rejected"] == [A("Green.")] and row["pair_id"] != "None"


@pytest.mark.parametrize("case,expect", [
    ("no_shared_prefix", "row 2: chosen and rejected share no leading message, so there is no prompt"),
    ("empty_tail", "row 2: rejected has nothing after the messages it shares"),
    ("two_message_tail", "row 2: chosen has 3 messages after the messages it shares"),
    ("strings_without_prompt", "row 2: chosen and rejected share no leading message"),
    ("null_prompt", "row 2: column 'prompt' is null; expected a string or a non-empty list"),
    ("number_response", "row 2: column 'chosen' is int '7'"),
    ("message_without_content", "row 2: column 'rejected' is list"),
    ("no_chosen", "missing ['chosen']"),
])
def test_pairs_that_cannot_be_read_are_one_line_naming_the_row(tmp_path, case, expect):
    good = {"chosen": [U("Q?"), A("Yes.")], "rejected": [U("Q?"), A("No.")]}
    bad = {"no_shared_prefix": {"chosen": [U("Q?"), A("Yes.")], "rejected": [U("R?"), A("No.")]},
           "empty_tail": {"chosen": [U("Q?"), A("Yes.")], "rejected": [U("Q?")]},
           "two_message_tail": {"chosen": [U("Q?"), A("Yes."), U("More?"), A("Sure.")],
                                "rejected": [U("Q?"), A("No.")]},
           "strings_without_prompt": {"chosen": "Yes.", "rejected": "No."},
           "null_prompt": {"prompt": None, "chosen": "Yes.", "rejected": "No."},
           "number_response": {"prompt": "Q?", "chosen": 7, "rejected": "No."},
           "message_without_content": {"prompt": "Q?", "chosen": "Yes.", "rejected": [{"role": "assistant"}]},
           "no_chosen": {"prompt": "Q?", "rejected": "No."}}[case]
    first = {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."} if "prompt" in bad else good
    if case == "no_chosen":
        first = {"prompt": "Q?", "rejected": "No."}
    with pytest.raises(UserError, match=None) as e:
        rows_of([first, bad], tmp_path)
    assert expect in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_implicit_prompt_pairs_train_through_stage_3(tmp_path, model_path):
    """End to end: a TRL implicit-prompt JSONL (no prompt column) trains on the quickstart config."""
    from conftest import REPO, run_stage

    talk = [{"role": "system", "content": "Answer in one short sentence."}]
    rows = [{"chosen": talk + [U(f"What is {i} plus {i}?"), A(f"{2 * i}.")],
             "rejected": talk + [U(f"What is {i} plus {i}?"), A(f"I think it might be {2 * i + 1}, or so.")]}
            for i in range(4)]
    pairs = tmp_path / "implicit.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_stage("03_dpo_train/train.py", REPO / "configs/quickstart/03_dpo_train.yaml", f"train_path={pairs}",
                     f"output_dir={tmp_path / 'out'}", "num_epochs=1", "eval_steps=0", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "03_dpo_train" / "manifest.json").read_text())
    assert manifest["rows"]["pairs_trained"] == 4, manifest["rows"]
