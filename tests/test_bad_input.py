"""Bad input costs nothing (issue 22): degenerate pairs, repeated ids, empty prompts and model folders that cannot
work are named in one line before Ray starts (the stage scripts run here as subprocesses and stop in seconds), or
dropped and counted where the data is still usable."""
import json
from pathlib import Path

import pytest

from common.errors import UserError
from conftest import REPO, one_line_error, run_stage

QUICK = REPO / "configs/quickstart"
TRAIN = "03_dpo_train/train.py"


def pairs_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair(i: int, chosen: str | None = None, rejected: str | None = None, **extra) -> dict:
    return {"prompt": f"Summarize text number {i}.", "chosen": chosen or f"Short summary {i}.",
            "rejected": rejected or f"A much longer and rambling summary of text number {i}.", **extra}


# ---------------------------------------------------------------- stage 3: degenerate pairs, too few, repeated ids
def test_a_pair_with_chosen_equal_to_rejected_is_dropped_as_identical(model_path):
    from common.tokenize import DROP_IDENTICAL, load_tokenizer, tokenize_pair

    tok = load_tokenizer(model_path)
    prompt = [{"role": "user", "content": "Summarize."}]
    assert tokenize_pair(tok, prompt, "Same words.", "Same words.", 512, 384) == DROP_IDENTICAL
    # different texts that truncation cuts to the same tokens are as useless
    long_a, long_b = "word " * 60 + "end A.", "word " * 60 + "end B."
    assert tokenize_pair(tok, prompt, long_a, long_b, 64, 32, truncation="truncate_response") == DROP_IDENTICAL
    assert isinstance(tokenize_pair(tok, prompt, "Short.", "Longer answer.", 512, 384), dict)


@pytest.mark.parametrize("case", ["all_identical", "one_pair", "fewer_than_workers", "repeated_pair_id",
                                  "repeated_pair"])
def test_stage3_pairs_that_cannot_train_are_one_line_before_ray(tmp_path, case):
    rows = {
        "all_identical": [pair(i, chosen="Same.", rejected="Same.") for i in range(4)],
        "one_pair": [pair(0)],
        "fewer_than_workers": [pair(i) for i in range(3)] + [pair(9, chosen="Same.", rejected="Same.")],
        "repeated_pair_id": [pair(i, pair_id=f"p{i}") for i in range(3)] + [pair(7, pair_id="p1")],
        "repeated_pair": [pair(i) for i in range(3)] + [pair(1)],
    }[case]
    sets = [f"train_path={pairs_file(tmp_path / 'pairs.jsonl', rows)}", f"output_dir={tmp_path / 'out'}"]
    if case == "fewer_than_workers":
        sets += ["num_devices=2", "train_batch_size_per_device=2", "worker_resources={}", "num_cpus_per_worker=0.5"]
    proc = run_stage(TRAIN, QUICK / "03_dpo_train.yaml", *sets, timeout=300)
    line = one_line_error(proc)
    expect = {"all_identical": "all 4 pairs have chosen identical to rejected",
              "one_pair": "1 trainable pairs but one step needs num_devices (1) x train_batch_size_per_device (2)",
              "fewer_than_workers": "3 trainable pairs (1 with chosen identical to rejected dropped)",
              "repeated_pair_id": "pair id 'p1' appears twice (rows 2 and 4)",
              "repeated_pair": "appears twice (rows 2 and 4)"}[case]
    assert expect in line, line
    assert "ray" not in proc.stderr.lower().replace("ray.num_cpus", ""), proc.stderr[-2000:]
    assert not (tmp_path / "out" / "03_dpo_train").exists()


# ---------------------------------------------------------------- repeated ids, empty prompts (stages 1 and 4)
def prompts_file(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"ticket": i, "body": t}) + "\n" for i, t in rows))
    return path


PROMPT_SETS = ["data.columns={id: ticket, text: body}", "prompt.template=Title this ticket.\n\n{text}"]


def test_empty_texts_are_dropped_and_counted(tmp_path):
    from common.config import DataConfig, PromptConfig
    from common.data import load_prompts

    data = prompts_file(tmp_path / "p.jsonl", [("a", "A real ticket."), ("b", "   "), ("c", ""), ("d", "Another.")])
    rows, empty = load_prompts(DataConfig(path=str(data), columns={"id": "ticket", "text": "body"}),
                               PromptConfig(template="{text}"), "x.yaml")
    assert [r["prompt_id"] for r in rows] == ["a", "d"] and empty == 2
    with pytest.raises(UserError, match="every row of .* has an empty text"):
        load_prompts(DataConfig(path=str(prompts_file(tmp_path / "q.jsonl", [("a", " ")])),
                                columns={"id": "ticket", "text": "body"}), PromptConfig(template="{text}"), "x.yaml")


def test_stage1_repeated_prompt_id_is_one_line(tmp_path):
    data = prompts_file(tmp_path / "p.jsonl", [("a", "One."), ("b", "Two."), ("a", "Three.")])
    proc = run_stage("01_generate/generate.py", QUICK / "01_generate.yaml", f"data.path={data}",
                     f"output_dir={tmp_path / 'out'}", *PROMPT_SETS, timeout=300)
    line = one_line_error(proc)
    assert "prompt ids must be unique but column 'ticket' repeats ['a']" in line, line
    assert not (tmp_path / "out" / "01_generate").exists()


def stage4_run(tmp_path, model_path):
    from test_evaluate_stage import fake_dpo_stage, fake_judge_stage

    fake_judge_stage(tmp_path)
    fake_dpo_stage(tmp_path, model_path)


@pytest.mark.parametrize("case", ["repeated_output_id", "repeated_prompt_id"])
def test_stage4_repeated_ids_are_one_line(tmp_path, model_path, case):
    stage4_run(tmp_path, model_path)
    data = prompts_file(tmp_path / "p.jsonl", [("a", "One."), ("b", "Two.")] +
                        ([("a", "Three.")] if case == "repeated_prompt_id" else []))
    answers = [("a", "x"), ("b", "y")] + ([("b", "z")] if case == "repeated_output_id" else [])
    outputs = tmp_path / "other.jsonl"
    outputs.write_text("".join(json.dumps({"id": i, "response": r}) + "\n" for i, r in answers))
    proc = run_stage("04_evaluate/evaluate.py", QUICK / "04_evaluate.yaml", f"output_dir={tmp_path}",
                     f"data.path={data}", *PROMPT_SETS, f"others=[{{name: other, outputs: {outputs}}}]", timeout=300)
    line = one_line_error(proc)
    expect = {"repeated_output_id": f"{outputs} answers id b twice (lines 2 and 3); keep one response per id",
              "repeated_prompt_id": "column 'ticket' repeats ['a']"}[case]
    assert expect in line, line
    assert not (tmp_path / "04_evaluate").exists()


# ---------------------------------------------------------------- exit codes: 2 for bad input, 1 for a failed run
def test_exit_code_2_for_bad_input_even_from_inside_ray_and_1_for_a_crash(capsys):
    from common.errors import cli

    def fails_with(e):
        @cli
        def main():
            raise e
        with pytest.raises(SystemExit) as exit_:
            main()
        return exit_.value.code, capsys.readouterr().err.strip().splitlines()

    code, err = fails_with(UserError("x.yaml: bad thing; fix it"))
    assert code == 2 and err == ["error: x.yaml: bad thing; fix it"]
    from ray.exceptions import RayTaskError

    # as Ray hands the driver a UserError raised in a task: a RayTaskError(UserError) whose message is a traceback
    wrapped = RayTaskError("fn", "Traceback (most recent call last):\n  ...",
                           UserError("pairs.jsonl: bad pair; fix it"))
    code, err = fails_with(wrapped.as_instanceof_cause())
    assert code == 2 and err == ["error: pairs.jsonl: bad pair; fix it"]
    try:
        try:
            raise OSError("engine core died")
        except OSError as inner:
            raise RuntimeError("generation failed") from inner
    except RuntimeError as crash:
        code, err = fails_with(crash)
    assert code == 1 and "Traceback" in err[0]
    assert err[-1].startswith("error: the run failed (not your input, exit 1): OSError: engine core died;")


# ---------------------------------------------------------------- model folders that cannot work: before Ray or vLLM
def model_copy(tmp_path, model_path, config: str | None = None, weights: bool = True) -> Path:
    """The embedded model's files linked into a folder of its own, with `config` as its config.json."""
    folder = tmp_path / "model"
    folder.mkdir()
    for f in Path(model_path).iterdir():
        if f.name == "config.json" and config is not None:
            (folder / f.name).write_text(config)
        elif weights or f.suffix != ".safetensors":
            (folder / f.name).symlink_to(f)
    return folder


@pytest.mark.parametrize("case", ["broken_config", "config_not_an_object", "no_weights", "max_model_len"])
def test_stage1_model_folder_that_cannot_load_is_one_line_before_vllm(tmp_path, model_path, case):
    model = {"broken_config": lambda: model_copy(tmp_path, model_path, config='{"model_type": "llama",'),
             "config_not_an_object": lambda: model_copy(tmp_path, model_path, config="[1, 2]"),
             "no_weights": lambda: model_copy(tmp_path, model_path, weights=False),
             "max_model_len": lambda: Path(model_path)}[case]()
    data = prompts_file(tmp_path / "p.jsonl", [("a", "One.")])
    sets = [f"model.path={model}", f"data.path={data}", f"output_dir={tmp_path / 'out'}", *PROMPT_SETS]
    if case == "max_model_len":
        sets.append("model.max_model_len=100000")
    line = one_line_error(run_stage("01_generate/generate.py", QUICK / "01_generate.yaml", *sets, timeout=300))
    expect = {"broken_config": "config.json is not valid JSON", "config_not_an_object": "is not a JSON object",
              "no_weights": "has a config.json but no weights",
              "max_model_len": "model.max_model_len=100000 is beyond what"}[case]
    assert expect in line, line
    if case == "max_model_len":
        assert "set model.max_model_len <= 8192" in line
    assert not (tmp_path / "out" / "01_generate").exists()


def test_stage4_max_model_len_beyond_a_model_is_one_line(tmp_path, model_path):
    stage4_run(tmp_path, model_path)
    proc = run_stage("04_evaluate/evaluate.py", QUICK / "04_evaluate.yaml", f"output_dir={tmp_path}",
                     "model.max_model_len=100000", timeout=300)
    assert "model.max_model_len=100000 is beyond what" in one_line_error(proc)
    assert not (tmp_path / "04_evaluate").exists()


def test_stage3_lora_target_that_matches_nothing_is_one_line_listing_the_modules(tmp_path):
    pairs = pairs_file(tmp_path / "pairs.jsonl", [pair(i) for i in range(4)])
    proc = run_stage(TRAIN, QUICK / "03_dpo_train.yaml", f"train_path={pairs}", f"output_dir={tmp_path / 'out'}",
                     "lora_config.target_modules=[qproj, vproj]", timeout=300)
    line = one_line_error(proc)
    assert "lora_config.target_modules ['qproj', 'vproj'] match no module of" in line, line
    assert "'q_proj'" in line and "'down_proj'" in line and "'self_attn'" not in line  # leaves, not containers
    assert "Ray" not in proc.stderr and not (tmp_path / "out" / "03_dpo_train").exists()


def test_lora_targets_follow_peft_matching(model_path):
    from common.model_check import check_lora_targets

    check_lora_targets(model_path, {"target_modules": ["q_proj"]}, "x.yaml")  # a suffix of a dotted name
    check_lora_targets(model_path, {"target_modules": ["self_attn.q_proj"]}, "x.yaml")
    with pytest.raises(UserError, match="match no module"):
        check_lora_targets(model_path, {"target_modules": ["proj"]}, "x.yaml")  # not a whole name part
