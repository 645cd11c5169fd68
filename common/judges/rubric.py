"""The rubric judge: a judge LLM rates each response on a 1..scale_max scale, from the prompt in the config.

Pointwise (default): SCORE = the rating; the reply is asked for as {"score": n} (vLLM structured outputs when
`judge.llm.guided_json`), and plain replies such as "Score: 7", "7/10" or "7" are read too; anything else is NaN.

Pairwise (`judge.rubric.pairwise: true`): for every two distinct responses to a prompt the judge picks the better
one ({"winner": "A" | "B" | "tie"}) twice, once in each order. Only a verdict given in both orders counts; a pair
judged differently in the two orders (position bias) counts as a tie, and the share of such pairs is reported as
the disagreement rate. SCORE = (wins + 0.5 x ties) / comparisons, in [0, 1]: set pairing.quality_threshold on that
scale. n responses per prompt cost n x (n - 1) judge calls.
"""
from __future__ import annotations

import functools
import math
import re
from collections import Counter, defaultdict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from common import schema as S
from common.config import LLMJudgeConfig, RubricConfig
from common.data import num_blocks
from common.judges.base import with_scores
from common.judges.llm import RAW, SKIPPED, ask, llm_asks, parse_reply, score_replies
from common.ray_setup import Ask

RATING_FORMAT = '\n\nReply with JSON only: {{"score": <an integer from 1 to {scale_max}>}}'
VERDICT_FORMAT = ('\n\nReply with JSON only: {"winner": "A"} or {"winner": "B"}, or {"winner": "tie"} if neither is'
                  ' better.')
_A, _B = "_rubric_a", "_rubric_b"
_VERDICTS = {"a": "A", "b": "B", "tie": "tie", "neither": "tie", "equal": "tie"}


# ---------------------------------------------------------------- the replies, as pydantic models
def _whole_number(value: Any) -> int | None:
    try:
        f = float(str(value).strip())
    except ValueError:
        return None
    return int(f) if math.isfinite(f) and f.is_integer() else None


def _read_rating(data: Any, scale_max: int) -> int | None:
    """JSON {"score"|"rating": n} ("8" and 8.0 read as 8), else prose: "score: n", "n/10", "n out of 10", or a
    reply that is just the number. Never the first number of some prose (it may be quoted)."""
    if isinstance(data, dict):
        key = next((k for k in ("score", "rating", "Score", "Rating") if k in data), None)
        return None if key is None else _whole_number(data[key])
    if not isinstance(data, str):
        return None
    for pattern in (r"^\**(\d+(?:\.0)?)\**\.?$", r"(?:score|rating)\W{0,4}(\d+(?:\.0)?)\b",
                    rf"\b(\d+(?:\.0)?)\s*(?:/|out of)\s*{scale_max}\b"):
        m = re.search(pattern, data.strip(), re.I)
        if m:
            return _whole_number(m.group(1))
    return None


@functools.lru_cache(maxsize=None)
def rating_model(scale_max: int) -> type[BaseModel]:
    """The pointwise reply: {"score": n}, n in 1..scale_max (read from what judges write: see _read_rating)."""
    class Rating(BaseModel):
        model_config = ConfigDict(extra="forbid")
        score: Literal[tuple(range(1, scale_max + 1))]  # type: ignore[valid-type]

        @model_validator(mode="before")
        @classmethod
        def _read(cls, data: Any) -> Any:
            return {"score": _read_rating(data, scale_max)}

    return Rating


class Verdict(BaseModel):
    """The pairwise reply: {"winner": "A" | "B" | "tie"}; also read under "better", and from plain replies such as
    "A", "Summary B", "**A**", "Neither" (a tie)."""
    model_config = ConfigDict(extra="forbid")
    winner: Literal["A", "B", "tie"]

    @model_validator(mode="before")
    @classmethod
    def _read(cls, data: Any) -> Any:
        value = data.get("winner", data.get("better")) if isinstance(data, dict) else data
        s = re.sub(r"^(summary|response|answer|option)\s+", "", str(value or "").strip().strip("*.\"' ").lower())
        return {"winner": _VERDICTS.get(s)}


# ---------------------------------------------------------------- parsing (pure, unit-tested)
def parse_rating(text: str | None, scale_max: int) -> float:
    """The rating in 1..scale_max (see rating_model), or NaN."""
    reply = parse_reply(text, rating_model(scale_max))
    return float(reply.score) if reply else math.nan


def parse_verdict(text: str | None) -> str | None:
    """"A", "B", "tie" (see Verdict) or None."""
    reply = parse_reply(text, Verdict)
    return reply.winner if reply else None


def combine_orders(first: str | None, second: str | None) -> str:
    """Verdicts on (x as A, y as B) and (y as A, x as B) -> "x", "y", "tie", "inconsistent" or "unparseable"."""
    if first is None or second is None:
        return "unparseable"
    one = {"A": "x", "B": "y", "tie": "tie"}[first]
    two = {"A": "y", "B": "x", "tie": "tie"}[second]
    return one if one == two else "inconsistent"


def win_shares(outcomes: list[tuple[str, str, str]]) -> dict[str, dict[str, Any]]:
    """(x, y, outcome) per compared pair -> per response: score = (wins + 0.5 x ties) / readable comparisons, with
    inconsistent verdicts counted as ties; NaN when none of its comparisons was readable."""
    tally: dict[str, dict[str, int]] = defaultdict(lambda: dict(wins=0, losses=0, ties=0, inconsistent=0,
                                                                 unparseable=0))
    for x, y, outcome in outcomes:
        if outcome in ("x", "y"):
            winner, loser = (x, y) if outcome == "x" else (y, x)
            tally[winner]["wins"] += 1
            tally[loser]["losses"] += 1
        else:
            key = {"tie": "ties"}.get(outcome, outcome)
            tally[x][key] += 1
            tally[y][key] += 1
    out = {}
    for r, t in tally.items():
        readable = t["wins"] + t["losses"] + t["ties"] + t["inconsistent"]
        score = (t["wins"] + 0.5 * (t["ties"] + t["inconsistent"])) / readable if readable else math.nan
        out[r] = dict(t, score=score)
    return out


# ---------------------------------------------------------------- the judge
def _rate(raw: str, scale_max: int) -> tuple[float, dict[str, Any]]:
    score = parse_rating(raw, scale_max)
    return (math.nan, {"rating": None, "error": "rating_unparseable"}) if math.isnan(score) else \
        (score, {"rating": int(score)})


class RubricJudge:
    def __init__(self, llm: LLMJudgeConfig, rubric: RubricConfig):
        self.llm, self.rubric = llm, rubric
        self.pair_stats: dict[str, Any] = {}

    def asks(self) -> list[Ask]:
        return llm_asks(self.llm)

    def score(self, ds):
        return self._pairwise(ds) if self.rubric.pairwise else self._pointwise(ds)

    def _pointwise(self, ds):
        rubric = self.rubric

        def build(row):
            text = rubric.prompt.format(source=row[S.SOURCE], response=row[S.RESPONSE], scale_max=rubric.scale_max)
            return [{"role": "user", "content": text + RATING_FORMAT.format(scale_max=rubric.scale_max)}]

        rated = ask(ds, self.llm, build=build, reply=rating_model(rubric.scale_max), max_tokens=self.llm.max_tokens)
        read = functools.partial(_rate, scale_max=rubric.scale_max)
        return rated.map_batches(score_replies, fn_args=(read,), num_cpus=0.25)

    def _pairwise(self, ds):
        """The comparisons run now (they need every response of a prompt at once); the returned Dataset is lazy."""
        import ray

        rubric = self.rubric
        ds = ds.materialize()  # read twice: to list the responses, then to attach their scores
        by_prompt: dict[str, dict[str, str]] = defaultdict(dict)
        sources: dict[str, str] = {}
        for r in ds.select_columns([S.PROMPT_ID, S.SOURCE, S.RESPONSE]).iter_rows():
            by_prompt[r[S.PROMPT_ID]][r[S.RESPONSE]] = r[S.SOURCE]
            sources.setdefault(r[S.PROMPT_ID], r[S.SOURCE])
        items = []
        for pid, responses in by_prompt.items():
            texts = list(responses)
            for i in range(len(texts)):
                for j in range(len(texts)):
                    if i != j:  # both orders of every distinct pair
                        items.append({S.PROMPT_ID: pid, S.SOURCE: sources[pid], _A: texts[i], _B: texts[j]})

        def build(row):
            text = rubric.pairwise_prompt.format(source=row[S.SOURCE], a=row[_A], b=row[_B])
            return [{"role": "user", "content": text + VERDICT_FORMAT}]

        verdicts: dict[tuple[str, str, str], str | None] = {}
        if items:
            blocks = num_blocks(len(items), self.llm.engine.concurrency)
            for r in ask(ray.data.from_items(items, override_num_blocks=blocks), self.llm, build=build,
                         reply=Verdict, max_tokens=min(self.llm.max_tokens, 16)).take_all():
                verdicts[(r[S.PROMPT_ID], r[_A], r[_B])] = None if r[SKIPPED] else parse_verdict(r[RAW])
        shares: dict[str, dict[str, dict]] = {}
        kinds: Counter = Counter()
        for pid, responses in by_prompt.items():
            texts = list(responses)
            outcomes = [(x, y, combine_orders(verdicts[(pid, x, y)], verdicts[(pid, y, x)]))
                        for i, x in enumerate(texts) for y in texts[i + 1:]]
            kinds.update(o for _, _, o in outcomes)
            shares[pid] = win_shares(outcomes)
        readable = sum(kinds.values()) - kinds["unparseable"]
        self.pair_stats = {"comparisons": sum(kinds.values()), "consistent": readable - kinds["inconsistent"],
                           "inconsistent": kinds["inconsistent"], "unparseable": kinds["unparseable"],
                           "disagreement_rate": round(kinds["inconsistent"] / readable, 3) if readable else None}

        def attach(batch):
            got = [shares.get(p, {}).get(r) for p, r in zip(batch[S.PROMPT_ID], batch[S.RESPONSE])]
            scores = [g["score"] if g else math.nan for g in got]
            details = [dict(g) if g else {"error": "no_other_response"} for g in got]
            for d in details:
                d.pop("score", None)
            return with_scores(batch, scores, details)

        return ds.map_batches(attach, num_cpus=0.25)

    def summary(self, details: list[dict]) -> dict:
        if self.rubric.pairwise:
            return dict(self.pair_stats)
        ratings = [d["rating"] for d in details if d.get("rating") is not None]
        return {"mean_rating": round(sum(ratings) / len(ratings), 3) if ratings else None}
