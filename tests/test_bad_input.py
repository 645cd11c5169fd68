"""Bad input costs nothing (issue 22), the in-process parts: degenerate pairs and empty prompts dropped and counted
where the data is still usable, exit codes, LoRA target matching. The stage scripts run on bad input (one `error:`
line, exit 2, nothing written) are the corpus: tests/bad_inputs/, run by tests/test_bad_inputs_corpus.py."""
import json
from pathlib import Path

import pytest

from common.errors import UserError


# ---------------------------------------------------------------- stage 3: identical chosen and rejected
def test_a_pair_with_chosen_equal_to_rejected_is_dropped_as_identical(model_path):
    from common.tokenize import DROP_IDENTICAL, load_tokenizer, tokenize_pair

    tok = load_tokenizer(model_path)
    prompt = [{"role": "user", "content": "Summarize."}]
    assert tokenize_pair(tok, prompt, "Same words.", "Same words.", 512, 384) == DROP_IDENTICAL
    # different texts that truncation cuts to the same tokens are as useless
    long_a, long_b = "word " * 60 + "end A.", "word " * 60 + "end B."
    assert tokenize_pair(tok, prompt, long_a, long_b, 64, 32, truncation="truncate_response") == DROP_IDENTICAL
    assert isinstance(tokenize_pair(tok, prompt, "Short.", "Longer answer.", 512, 384), dict)


# ---------------------------------------------------------------- empty prompts (stages 1 and 4)
def prompts_file(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"ticket": i, "body": t}) + "\n" for i, t in rows))
    return path


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


def test_lora_targets_follow_peft_matching(model_path):
    from common.model_check import check_lora_targets

    check_lora_targets(model_path, {"target_modules": ["q_proj"]}, "x.yaml")  # a suffix of a dotted name
    check_lora_targets(model_path, {"target_modules": ["self_attn.q_proj"]}, "x.yaml")
    with pytest.raises(UserError, match="match no module") as e:
        check_lora_targets(model_path, {"target_modules": ["proj"]}, "x.yaml")  # not a whole name part
    assert "'q_proj'" in str(e.value) and "'self_attn'" not in str(e.value)  # leaves listed, not containers
