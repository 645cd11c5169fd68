"""common.tokenize on the real embedded tokenizer: the one tokenisation the reference actors and the trainer share."""
import pytest

from common.tokenize import (DROP_EMPTY, DROP_TOO_LONG, collate_pairs, load_tokenizer, prompt_ids, response_ids,
                             tokenize_pair)

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


def test_long_prompt_is_cut_from_the_left_and_the_response_kept(tok):
    long_prompt = [{"role": "user", "content": "word " * 300 + "END"}]
    t = tokenize_pair(tok, long_prompt, "short answer", "another answer", max_length=128, max_prompt_length=64)
    assert len(t["prompt_ids"]) == 64
    assert tok.decode(t["prompt_ids"]).endswith("END<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(t["chosen_ids"]) == "short answer<|im_end|>"


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
