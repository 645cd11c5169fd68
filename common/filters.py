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


# Above this share of a run's candidates removed by one filter, stage 2 warns: a filter built for the quickstart's
# summaries (no backticks, no underscores) can silently eat most of another task's answers.
WARN_SHARE = 0.25
# filter -> the config key that changes it, and what to do
FILTER_KEYS = {
    "empty": ("filters.drop_empty", "blank answers: check stage 1's prompt and model"),
    "too_short": ("filters.min_words", "lower it if short answers are right for your task"),
    "too_long": ("filters.max_words", "raise it if long answers are right for your task"),
    "invalid_chars": ("filters.invalid_chars", "its regex forbids characters your answers contain (code, "
                      "markdown?); narrow it, or \"\" turns it off"),
    "duplicate": ("filters.drop_duplicates", "candidates of a prompt repeat: raise stage 1's sampling.temperature"),
}


def filter_warnings(removed: dict[str, int], total: int, share: float = WARN_SHARE) -> list[str]:
    """One warning per filter that removed more than `share` of the `total` candidates ({filter: count})."""
    out = []
    for reason, count in removed.items():
        if total and count / total > share:
            key, hint = FILTER_KEYS.get(reason, (f"filters ({reason})", ""))
            out.append(f"warning: the `{reason}` filter removed {count / total:.0%} of the candidates ({count} of "
                       f"{total}), more than {share:.0%}; change `{key}` in the stage-2 config"
                       f"{f' ({hint})' if hint else ''}")
    return out
