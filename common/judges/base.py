"""What every judge shares: the interface, word counting, and the three columns a judge adds.

A judge is any object with

    asks() -> list[Ask]          the Ray workers it starts (for the resource plan, before anything starts)
    score(ds) -> Dataset         every input column + SCORE (float, NaN = unparseable), NUM_WORDS, JUDGE_DETAIL
    summary(details) -> dict     judge-specific counts for the manifest, from the parsed JUDGE_DETAILs

`ds` needs PROMPT_ID, SOURCE and RESPONSE. Higher SCORE is better; the pairing rule (common.pairing) and the
stage-4 win rate both read SCORE, so a judge's SCORE is its whole opinion of a response.
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Protocol

import numpy as np

from common import schema as S
from common.ray_setup import Ask


class Judge(Protocol):
    def asks(self) -> list[Ask]: ...

    def score(self, ds): ...

    def summary(self, details: list[dict[str, Any]]) -> dict[str, Any]: ...


def num_words(text: Any) -> int:
    """Whitespace words: what min/max_words, min_length_gap and every length statistic count."""
    return len(str(text or "").split())


def detail_json(d: dict[str, Any]) -> str:
    """JUDGE_DETAIL: compact JSON; NaN becomes null so any JSON reader can load it."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
    return json.dumps(clean, ensure_ascii=False, separators=(",", ":"))


def with_scores(batch, scores: Iterable[float], details: Iterable[dict]):
    """The batch plus SCORE (float64), NUM_WORDS (int64) and JUDGE_DETAIL (JSON str). `batch` is a dict of numpy
    arrays or a pyarrow Table (batch_format="pyarrow" keeps nested columns such as PROMPT in Arrow)."""
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        words = [num_words(r) for r in batch.column(S.RESPONSE).to_pylist()]
        return (batch.append_column(S.SCORE, pa.array(list(scores), pa.float64()))
                .append_column(S.NUM_WORDS, pa.array(words, pa.int64()))
                .append_column(S.JUDGE_DETAIL, pa.array([detail_json(d) for d in details], pa.string())))
    out = dict(batch)
    out[S.SCORE] = np.asarray(list(scores), dtype=np.float64)
    out[S.NUM_WORDS] = np.asarray([num_words(r) for r in batch[S.RESPONSE]], dtype=np.int64)
    out[S.JUDGE_DETAIL] = np.asarray([detail_json(d) for d in details], dtype=object)
    return out
