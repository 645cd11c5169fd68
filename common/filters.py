"""Deterministic filters applied to stage 1's candidates before the judge scores them (config `filters`).

In order, a candidate is removed when it is: `empty` (blank), `too_short` (< min_words), `too_long` (> max_words),
`invalid_chars` (the regex matches anywhere), or a `duplicate` of an earlier candidate of the same prompt (same
text up to whitespace; the first is kept). Words are whitespace words, as everywhere (common.judges.num_words).
"""
from __future__ import annotations

import re

import pandas as pd

from common import schema as S
from common.config import FilterConfig
from common.judges.base import num_words


def normalize(text: str) -> str:
    """What "identical text" means for duplicates and pairing: equal after collapsing whitespace."""
    return " ".join(str(text or "").split())


def text_reason(text: str, cfg: FilterConfig, invalid: re.Pattern | None = None) -> str:
    """Why one text is removed ("" = kept), duplicates aside."""
    if cfg.drop_empty and not str(text or "").strip():
        return "empty"
    words = num_words(text)
    if words < cfg.min_words:
        return "too_short"
    if words > cfg.max_words:
        return "too_long"
    if invalid is None and cfg.invalid_chars:
        invalid = re.compile(cfg.invalid_chars)
    if invalid is not None and invalid.search(str(text or "")):
        return "invalid_chars"
    return ""


def filter_reasons(df: pd.DataFrame, cfg: FilterConfig) -> list[str]:
    """Per row: "" if kept, else why it is removed. Row order decides which duplicate is kept: sort first."""
    invalid = re.compile(cfg.invalid_chars) if cfg.invalid_chars else None
    reasons = [text_reason(t, cfg, invalid) for t in df[S.RESPONSE]]
    if cfg.drop_duplicates:
        seen: set[tuple[str, str]] = set()
        for i, (pid, text) in enumerate(zip(df[S.PROMPT_ID], df[S.RESPONSE])):
            if reasons[i]:
                continue
            key = (pid, normalize(text))
            if key in seen:
                reasons[i] = "duplicate"
            seen.add(key)
    return reasons

