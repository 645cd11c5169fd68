"""Asking a judge LLM, for the `quiz` and `rubric` judges: the same vLLM-on-Ray-Data engine as stage 1
(common.generation.build_engine), fed our own tokenised chat prompts, plus forgiving reply parsing.

`ask(ds, llm, build, reply, max_tokens)` adds two columns: RAW, the judge's reply to the chat messages `build(row)`
makes for each row, and SKIPPED, why a row was not sent ("" when it was). `reply` is a pydantic model: with
`llm.guided_json` vLLM's structured outputs constrain the reply to its JSON schema (`reply.model_json_schema()`).
`parse_reply` validates a reply against the same model, after `extract_json` has found the JSON in whatever a model
without structured outputs writes (code fences, prose around it, single quotes, trailing commas); each model's
before-validator maps the variants judges write onto the schema. `score_replies` turns the replies into scores the
same way for every LLM judge: a prompt too long for the judge's context is not sent (RAW = "", SKIPPED = the reason)
and, like a reply that does not validate, ends up unparseable: NaN, counted, never a crash.
"""
from __future__ import annotations

import ast
import json
import math
import re
from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ValidationError

from common import schema as S
from common.config import LLMJudgeConfig, require_model
from common.generation import build_engine, engine_asks
from common.judges.base import with_scores
from common.ray_setup import Ask
from common.tokenize import load_tokenizer, prompt_ids

RAW = "_judge_raw"  # the judge model's reply
SKIPPED = "_judge_skipped"  # "" or why the row was not sent to the judge
_COLUMNS = "_judge_columns"  # the caller's columns, to hand back exactly those (+ RAW, SKIPPED)
_MESSAGES = "_judge_prompt"  # our PROMPT column while it passes the engine (which reads `prompt` as text)
_SEP = "\x1f"


def llm_asks(llm: LLMJudgeConfig) -> list[Ask]:
    return engine_asks(llm.engine, "judge vLLM replica") + [Ask("judge prompt / parse task", 1, {"CPU": 0.25})]


def _prepare(row: dict[str, Any], build: Callable, model_path: str, trust: bool, max_prompt_tokens: int) -> dict:
    tok = load_tokenizer(model_path, trust)
    row[_COLUMNS] = _SEP.join(k for k in row)
    messages = build(row)
    if isinstance(messages, str):
        ids, skipped = [], messages
    else:
        ids, skipped = prompt_ids(tok, messages), ""
        if len(ids) > max_prompt_tokens:
            skipped, ids = f"judge_prompt_too_long ({len(ids)} > {max_prompt_tokens} tokens)", []
    # A skipped row still passes the engine, as a one-token prompt with max_tokens=1 (its reply is ignored),
    # so every row stays in the one lazy pipeline.
    ids = ids or [tok.eos_token_id]
    row[S.TOKENIZED], row[SKIPPED] = ids, skipped
    return row


def ask(ds, llm: LLMJudgeConfig, build: Callable[[dict], list[dict] | str], reply: type[BaseModel], max_tokens: int):
    """Rows -> the same rows + RAW (the judge's reply) + SKIPPED. Lazy. Greedy unless llm.temperature > 0.

    `build(row)` returns the chat messages to send, or a string: the reason not to ask about this row."""
    path = require_model(llm.model.path, "judge.llm.model.path")
    prepared = ds.map(_prepare, num_cpus=0.25, fn_kwargs=dict(
        build=build, model_path=path, trust=llm.model.trust_remote_code,
        max_prompt_tokens=llm.model.max_model_len - max_tokens))
    params: dict[str, Any] = dict(temperature=llm.temperature, max_tokens=max_tokens)
    if llm.guided_json:
        # A JSON string, not a dict: Ray Data would turn a nested dict into an Arrow struct and back.
        params["structured_outputs"] = {"json": json.dumps(reply.model_json_schema())}

    def preprocess(row):
        # In place: ray.data.llm merges the return value into this very row (see common.generation).
        if S.PROMPT in row:
            row[_MESSAGES] = row.pop(S.PROMPT)
        row["sampling_params"] = dict(params, max_tokens=1) if row[SKIPPED] else dict(params)
        return row

    def postprocess(row):
        out = {k: row[k] for k in row[_COLUMNS].split(_SEP) if k != S.PROMPT}
        if _MESSAGES in row:
            out[S.PROMPT] = row[_MESSAGES]
        out[RAW] = "" if row[SKIPPED] else row["generated_text"]
        out[SKIPPED] = row[SKIPPED]
        return out

    return build_engine(llm.model, llm.engine, preprocess=preprocess, postprocess=postprocess)(prepared)


# ---------------------------------------------------------------- parsing
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def _balanced(text: str, start: int) -> str | None:
    """The JSON object/array that starts at text[start], by bracket matching outside strings."""
    opener = text[start]
    closer = "}" if opener == "{" else "]"
    depth, in_str, esc, quote = 0, False, False, ""
    for i in range(start, len(text)):
        c = text[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == quote:
                in_str = False
        elif c in "\"'":
            in_str, quote = True, c
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return text[start:i + 1] if c == closer else None
    return None


def _loads(blob: str) -> Any:
    for attempt in (blob, re.sub(r",\s*([}\]])", r"\1", blob)):  # tolerate trailing commas
        try:
            return json.loads(attempt)
        except json.JSONDecodeError:
            pass
        try:  # single-quoted, Python-style dicts
            return ast.literal_eval(attempt)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass
    return None


def extract_json(text: str | None) -> Any:
    """The first JSON object or array in a model's reply, or None. Accepts code fences and prose around it."""
    if not text:
        return None
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for chunk in candidates:
        for m in re.finditer(r"[{\[]", chunk):
            blob = _balanced(chunk, m.start())
            if blob is not None:
                value = _loads(blob)
                if isinstance(value, (dict, list)):
                    return value
    return None


Reply = TypeVar("Reply", bound=BaseModel)


def parse_reply(text: str | None, model: type[Reply], **context: Any) -> Reply | None:
    """The judge's reply as `model`, or None when it does not validate. The first JSON value in the reply is
    validated (extract_json); a reply without JSON is validated as its text, for a model that also reads prose.
    `context` reaches the model's validators (pydantic's validation context)."""
    data = extract_json(text)
    try:
        return model.model_validate((text or "") if data is None else data, context=context)
    except ValidationError:
        return None


def score_replies(batch, read: Callable[..., tuple[float, dict]], *columns: str):
    """A batch of judge replies -> the batch + SCORE, NUM_WORDS, JUDGE_DETAIL (common.judges.base.with_scores).

    read(reply, *the row's `columns`) gives (score, detail). A row that was not sent gets NaN with error = why; a
    reply read as NaN keeps its first 2000 characters in the detail (`raw`), to see why. RAW, SKIPPED and `columns`
    are dropped."""
    scores, details = [], []
    for raw, skipped, *extra in zip(batch[RAW], batch[SKIPPED], *(batch[c] for c in columns)):
        score, detail = (math.nan, {"error": skipped}) if skipped else read(raw, *extra)
        if math.isnan(score) and not skipped:
            detail["raw"] = raw[:2000]
        scores.append(score)
        details.append(detail)
    out = with_scores(batch, scores, details)
    for k in (RAW, SKIPPED, *columns):
        out.pop(k)
    return out


def letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


_UNSURE = re.compile(r"^(unsure|not sure|unknown|i don'?t know|cannot (be )?determined?|n/?a|none|\?)\W*$", re.I)


def read_choice(value: Any, options: list[str]) -> str | None:
    """A reply naming one option -> its letter ("A".."E"); "unsure" and the like -> "unsure"; else None.
    Accepts "B", "b)", "(B)", "B. text", "Option B", 1-based indices (2 -> "B") and an option's exact text."""
    valid = letters(len(options))
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        i = int(value)
        return valid[i - 1] if float(value) == i and 1 <= i <= len(valid) else None
    s = str(value).strip()
    if _UNSURE.match(s):
        return "unsure"
    m = re.fullmatch(r"(?:option\s*)?\(?([A-Za-z])\)?(?:[.):]\s*.*)?", s, re.I | re.S)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    if s.isdigit():
        return read_choice(int(s), options)
    for letter, text in zip(valid, options):
        if s.lower() == str(text).strip().lower():
            return letter
    return None
