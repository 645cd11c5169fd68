"""common.tokenize on the real embedded tokenizer: the one tokenisation the reference actors and the trainer share."""
import pytest

from common.tokenize import (DROP_EMPTY, DROP_TOO_LONG, collate_pairs, fit_prompt, load_tokenizer, prompt_ids,
                             response_ids, tokenize_pair)

IM_START, IM_END = 1, 2
PROMPT = [{"role": "user", "content": "Summarize: the cat sat on the mat."}]


@pytest.fixture(scope="module")
def tok(model_path):
    return load_tokenizer(model_path)


def test_prompt_is_chatml_with_generation_prompt_and_one_bos(tok):
    ids = prompt_ids(tok, PROMPT)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's template adds its default system turn
    assert text.endswith("<|im_start|>user\nSummarize: the cat sat on the mat.<|im_end|>\n<|im_start|>assistant\n")
    assert ids[0] == IM_START and ids[1] != IM_START  # the template's <|im_start|>, not doubled


def test_response_ends_with_exactly_one_eos(tok):
    ids = response_ids(tok, "A cat sat.")
    assert ids[-1] == IM_END and IM_END not in ids[:-1] and IM_START not in ids


def test_pair_round_trips_to_the_chat_template(tok):
    """prompt ids + response ids == the template's rendering of the full conversation, minus its trailing newline."""
    t = tokenize_pair(tok, PROMPT, "A cat sat.", "The cat sat on a mat in the sun.", 512, 384)
    full = tok.apply_chat_template(PROMPT + [{"role": "assistant", "content": "A cat sat."}], tokenize=False)
    assert tok.decode(t["prompt_ids"] + t["chosen_ids"]) + "\n" == full


def template_around_content(tok, messages):
    """(ids before the last user message's text, ids after it) in the template's rendering of `messages`."""
    empty = prompt_ids(tok, messages[:-1] + [{"role": "user", "content": ""}])
    tail = tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert empty[-len(tail):] == tail
    return empty[:-len(tail)], tail


@pytest.mark.parametrize("system", [None, "You are a careful summarizer."])
def test_long_prompt_loses_the_start_of_its_text_never_the_template(tok, system):
    """Only the user's text is cut (from the left: its end sits next to the response); the template's opening
    (<|im_start|>, the system turn, the user header) and its generation prompt stay whole."""
    turns = [{"role": "system", "content": system}] if system else []
    long_prompt = turns + [{"role": "user", "content": "word " * 300 + "END"}]
    t = tokenize_pair(tok, long_prompt, "short answer", "another answer", max_length=128, max_prompt_length=64)
    p = t["prompt_ids"]
    head, tail = template_around_content(tok, long_prompt)
    assert len(p) <= 64 and p[:len(head)] == head and p[-len(tail):] == tail
    assert p[0] == IM_START and p.count(IM_START) == 3  # system (the default one if none given), user, assistant
    text = tok.decode(p[len(head):-len(tail)])
    assert text.endswith("word END") and ("word " * 300 + "END").endswith(text.lstrip())
    assert tok.decode(t["chosen_ids"]) == "short answer<|im_end|>"


def test_long_prompt_fills_its_budget(tok):
    """The cut keeps as much text as fits: one more token would not."""
    long_prompt = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog. " * 40}]
    for budget in (40, 57, 100):
        p = fit_prompt(tok, long_prompt, budget)
        assert budget - 2 <= len(p) <= budget


def test_prompt_whose_template_alone_is_too_long_is_dropped(tok):
    long_system = [{"role": "system", "content": "Be brief. " * 50}, {"role": "user", "content": "Hi."}]
    assert fit_prompt(tok, long_system, 32) is None
    assert tokenize_pair(tok, long_system, "ok then", "fine then", 128, 32) == DROP_TOO_LONG


def test_prompt_that_fits_is_rendered_unchanged(tok):
    assert fit_prompt(tok, PROMPT, 384) == prompt_ids(tok, PROMPT)


def test_pairs_that_do_not_fit_are_dropped_or_truncated(tok):
    long_resp = "many words " * 100
    assert tokenize_pair(tok, PROMPT, long_resp, "ok", 64, 48) == DROP_TOO_LONG
    t = tokenize_pair(tok, PROMPT, long_resp, "ok", 96, 48, truncation="truncate_response")
    assert len(t["prompt_ids"]) + len(t["chosen_ids"]) == 96


def test_empty_response_is_dropped(tok):
    assert tokenize_pair(tok, PROMPT, "  ", "fine", 512, 384) == DROP_EMPTY


def test_collate_masks_only_response_tokens():
    ids, attn, mask = collate_pairs([[5, 6, 7]], [[8, 2]], [[9, 10, 11, 2]], pad_id=2)
    assert ids.tolist() == [[5, 6, 7, 8, 2, 2, 2], [5, 6, 7, 9, 10, 11, 2]]
    assert attn.tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7]
    assert mask.int().tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]]
