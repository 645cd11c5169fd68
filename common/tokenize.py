"""Tokenisation, once: the prompt renderer used for generation, and the pair tokeniser shared by the reference
log-prob actors and the DPO trainer (so both score exactly the same tokens).

- Prompts go through the tokenizer's own chat template with the generation prompt, tokenised by the template
  itself, so a BOS the template writes is never doubled by `add_special_tokens`.
- A response is `tokens(text) + [eos]`, tokenised without special tokens: the loss sees the end-of-turn token
  the model must learn to emit, exactly once (TRL #4481, Axolotl #1616 are that bug).
- Too long: the text of the prompt's last user message is cut from the left until the rendered prompt fits
  `max_prompt_length` (its end, next to the response, matters most). The template is rendered again around the
  shorter text, so its special tokens, role markers and system turn stay whole; cutting the rendered ids instead
  would train on a sequence with no opening header. A prompt that does not fit even with an empty message is
  dropped (counted, as too long). If the pair still does not fit, it is dropped (counted) or its responses are
  cut, per config. The response is never silently cut to make room for the prompt (TRL #2209).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from common import schema as S

DROP_EMPTY, DROP_TOO_LONG = "empty_response", "too_long"
# chosen and rejected are the same tokens: the DPO loss is ln 2 whatever the policy does, so nothing is learnt
DROP_IDENTICAL = "identical_responses"
# Part of the reference cache's key: a change to how pairs become token ids must not reuse old log-probs.
TOKENIZATION_VERSION = 2
_MAX_CUTS = 8  # rounds of cutting a long prompt's message before dropping it (one settles it on ACLSum)


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def prompt_ids(tok, messages: list[dict[str, str]]) -> list[int]:
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    return list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))


def fit_prompt(tok, messages: list[dict[str, str]], max_prompt_length: int) -> list[int] | None:
    """The prompt's ids within `max_prompt_length`, the last user message's text cut from the left as needed;
    None if even an empty message does not fit (a long system prompt, say)."""
    ids = prompt_ids(tok, messages)
    if len(ids) <= max_prompt_length:
        return ids
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        return None
    last = users[-1]
    content = tok(messages[last]["content"], add_special_tokens=False)["input_ids"]
    # Decoding a cut and rendering it again can merge or split tokens at the cut, so measure and cut again: the
    # text shrinks every round, and the bound stops a tokenizer that would settle one token a round.
    for _ in range(_MAX_CUTS):
        content = content[len(ids) - max_prompt_length:]
        text = tok.decode(content).lstrip("\ufffd")  # a cut inside a multi-byte character leaves a stray piece
        msgs = [dict(m, content=text) if i == last else m for i, m in enumerate(messages)]
        ids = prompt_ids(tok, msgs)
        if len(ids) <= max_prompt_length:
            return ids
        if not content:
            return None
    return None


def response_ids(tok, text: str) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids + [tok.eos_token_id]


def response_text(messages_or_text: Any) -> str:
    """TRL's conversational format keeps a response as [{"role": "assistant", "content": ...}]."""
    if isinstance(messages_or_text, str):
        return messages_or_text
    return list(messages_or_text)[-1]["content"]


def empty_response(chosen_text: str, rejected_text: str) -> bool:
    """A pair with a blank side: the tokeniser's first drop (DROP_EMPTY), also counted by the pair scan before Ray."""
    return not chosen_text.strip() or not rejected_text.strip()


def tokenize_pair(tok, prompt: list[dict], chosen: Any, rejected: Any, max_length: int, max_prompt_length: int,
                  truncation: str = "drop") -> dict[str, list[int]] | str:
    """Token ids of one preference pair, or the reason it was dropped (DROP_EMPTY / DROP_TOO_LONG /
    DROP_IDENTICAL)."""
    c_text, r_text = response_text(chosen), response_text(rejected)
    if empty_response(c_text, r_text):
        return DROP_EMPTY
    p = fit_prompt(tok, prompt, max_prompt_length)
    if p is None:
        return DROP_TOO_LONG
    c, r = response_ids(tok, c_text), response_ids(tok, r_text)
    room = max_length - len(p)
    if max(len(c), len(r)) > room:
        if truncation == "drop" or room <= 0:
            return DROP_TOO_LONG
        c, r = c[:room], r[:room]
    if c == r:  # the same text, or texts that differ only where truncation cut them
        return DROP_IDENTICAL
    return {S.PROMPT_IDS: p, S.CHOSEN_IDS: c, S.REJECTED_IDS: r}


def tokenize_pairs_batch(batch: dict[str, np.ndarray], tok, max_length: int, max_prompt_length: int,
                         truncation: str, columns: tuple[str, str, str]) -> dict[str, np.ndarray]:
    """Ray Data batch -> the same batch plus prompt_ids/chosen_ids/rejected_ids and a `drop_reason` ("" = kept)."""
    pc, cc, rc = columns
    out = {S.PROMPT_IDS: [], S.CHOSEN_IDS: [], S.REJECTED_IDS: [], S.DROP_REASON: []}
    for prompt, chosen, rejected in zip(batch[pc], batch[cc], batch[rc]):
        t = tokenize_pair(tok, list(prompt), chosen, rejected, max_length, max_prompt_length, truncation)
        if isinstance(t, str):
            t, reason = {S.PROMPT_IDS: [], S.CHOSEN_IDS: [], S.REJECTED_IDS: []}, t
        else:
            reason = ""
        for k, v in t.items():
            out[k].append(np.asarray(v, dtype=np.int64))
        out[S.DROP_REASON].append(reason)
    result = dict(batch)
    for k, v in out.items():
        arr = np.empty(len(v), dtype=object)
        arr[:] = v
        result[k] = arr
    return result


def collate_pairs(prompt_ids, chosen_ids, rejected_ids, pad_id: int):
    """Concatenated forward inputs: rows [0, B) are prompt+chosen, rows [B, 2B) prompt+rejected, right-padded.
    Returns torch tensors input_ids, attention_mask and loss_mask (1 on response tokens only)."""
    import torch

    seqs, masks = [], []
    for resp_list in (chosen_ids, rejected_ids):
        for p, resp in zip(prompt_ids, resp_list):
            p, resp = list(p), list(resp)
            seqs.append(p + resp)
            masks.append([0] * len(p) + [1] * len(resp))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        loss[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids, attn, loss
