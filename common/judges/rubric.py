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

import math
import re
from collections import Counter, defaultdict
from typing import Any

from common import schema as S
from common.config import LLMJudgeConfig, RubricConfig
from common.data import num_blocks
from common.judges.base import with_scores
from common.judges.llm import RAW, SKIPPED, ask, extract_json, llm_asks
from common.ray_setup import Ask

RATING_FORMAT = '\n\nReply with JSON only: {{"score": <an integer from 1 to {scale_max}>}}'
VERDICT_FORMAT = ('\n\nReply with JSON only: {"winner": "A"} or {"winner": "B"}, or {"winner": "tie"} if neither is'
                  ' better.')
_A, _B = "_rubric_a", "_rubric_b"


def rating_schema(scale_max: int) -> dict:
    return {"type": "object", "properties": {"score": {"type": "integer", "enum": list(range(1, scale_max + 1))}},
            "required": ["score"], "additionalProperties": False}


VERDICT_SCHEMA = {"type": "object", "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]}},
                  "required": ["winner"], "additionalProperties": False}


# ---------------------------------------------------------------- parsing (pure, unit-tested)
def parse_rating(text: str | None, scale_max: int) -> float:
    """The rating in 1..scale_max, or NaN. JSON {"score"|"rating": n} first, then "score: n", "n/10",
    "n out of 10", or a reply that is just the number. Never the first number of some prose (it may be quoted)."""
    def ok(v: Any) -> float:
        try:
            f = float(str(v).strip())
        except ValueError:
            return math.nan
        return f if f == int(f) and 1 <= f <= scale_max else math.nan

    data = extract_json(text)
    if isinstance(data, dict):
        for key in ("score", "rating", "Score", "Rating"):
            if key in data:
                return ok(data[key])
        return math.nan
    t = (text or "").strip()
    for pat in (r"^\**(\d+(?:\.0)?)\**\.?$", r"(?:score|rating)\W{0,4}(\d+(?:\.0)?)\b",
                rf"\b(\d+(?:\.0)?)\s*(?:/|out of)\s*{scale_max}\b"):
        m = re.search(pat, t, re.I)
        if m:
            return ok(m.group(1))
    return math.nan


def parse_verdict(text: str | None) -> str | None:
    """"A", "B", "tie" or None. JSON {"winner": ...} first, then replies like "A", "Summary B", "Tie"."""
    data = extract_json(text)
    value = data.get("winner", data.get("better")) if isinstance(data, dict) else text
    s = str(value or "").strip().strip("*.\"' ").lower()
    s = re.sub(r"^(summary|response|answer|option)\s+", "", s)
    return {"a": "A", "b": "B", "tie": "tie", "neither": "tie", "equal": "tie"}.get(s)


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
def _rate_batch(batch, scale_max: int):
    scores, details = [], []
    for raw, skipped in zip(batch[RAW], batch[SKIPPED]):
        score = math.nan if skipped else parse_rating(raw, scale_max)
        detail: dict[str, Any] = {"rating": None if math.isnan(score) else int(score)}
        if skipped:
            detail["error"] = skipped
        elif math.isnan(score):
            detail.update(error="rating_unparseable", raw=raw[:2000])
        scores.append(score)
        details.append(detail)
    out = with_scores(batch, scores, details)
    out.pop(RAW), out.pop(SKIPPED)
    return out


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

        rated = ask(ds, self.llm, build=build, schema=rating_schema(rubric.scale_max), max_tokens=self.llm.max_tokens)
        return rated.map_batches(_rate_batch, fn_kwargs=dict(scale_max=rubric.scale_max), num_cpus=0.25)

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
                         schema=VERDICT_SCHEMA, max_tokens=min(self.llm.max_tokens, 16)).take_all():
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
