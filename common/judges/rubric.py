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
import json
import math
import re
from collections import Counter, defaultdict
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, model_validator

from common import schema as S
from common.config import LLMJudgeConfig, RubricConfig
from common.groups import TASK_CPUS, by_prompt, split_group, with_rows_of
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


_VERDICT, _SHARES = "_rubric_verdict", "_rubric_shares"
_KINDS = ("comparisons", "inconsistent", "unparseable")  # counted per prompt, summed for the manifest
_ITEMS = pa.schema([(S.PROMPT_ID, pa.string()), (S.SOURCE, pa.string()), (_A, pa.string()), (_B, pa.string())])


def _comparisons(group: pa.Table) -> pa.Table:
    """One prompt's responses -> a row per ordered pair of its distinct texts (both orders of each), with the source."""
    texts = list(dict.fromkeys(group.column(S.RESPONSE).to_pylist()))
    pairs = [(a, b) for a in texts for b in texts if a != b]
    n = len(pairs)
    return pa.Table.from_arrays([pa.array([group.column(S.PROMPT_ID)[0].as_py()] * n, pa.string()),
                                 pa.array([group.column(S.SOURCE)[0].as_py()] * n, pa.string()),
                                 pa.array([a for a, _ in pairs], pa.string()),
                                 pa.array([b for _, b in pairs], pa.string())], schema=_ITEMS)


def _read_verdicts(batch: pa.Table) -> pa.Table:
    verdicts = [None if skipped else parse_verdict(raw)
                for raw, skipped in zip(batch.column(RAW).to_pylist(), batch.column(SKIPPED).to_pylist())]
    return batch.select([S.PROMPT_ID, _A, _B]).append_column(_VERDICT, pa.array(verdicts, pa.string()))


def _shares(group: pa.Table) -> pa.Table:
    """One prompt's verdicts (both orders of each pair) -> one row: each response's win share (JSON) and counts."""
    verdict = {(a, b): v for a, b, v in zip(*(group.column(c).to_pylist() for c in (_A, _B, _VERDICT)))}
    texts = list(dict.fromkeys(group.column(_A).to_pylist()))
    outcomes = [(x, y, combine_orders(verdict.get((x, y)), verdict.get((y, x))))
                for i, x in enumerate(texts) for y in texts[i + 1:]]
    kinds = Counter(o for _, _, o in outcomes)
    return pa.table({S.PROMPT_ID: [group.column(S.PROMPT_ID)[0].as_py()],
                     _SHARES: [json.dumps(win_shares(outcomes))], "comparisons": [sum(kinds.values())],
                     "inconsistent": [kinds["inconsistent"]], "unparseable": [kinds["unparseable"]]})


def _with_shares(group: pa.Table) -> pa.Table:
    """One prompt's responses and its row of win shares (none when it had one distinct response; no such column when
    no prompt had two) -> the responses, scored (common.judges.base.with_scores)."""
    shares, rows = {}, group
    if _SHARES in group.column_names:
        own, rows = split_group(group, pc.is_valid(group.column(_SHARES)))
        shares = json.loads(own.column(_SHARES)[0].as_py()) if own.num_rows else {}
        rows = rows.drop_columns([_SHARES, *_KINDS])
    got = [shares.get(r) for r in rows.column(S.RESPONSE).to_pylist()]
    details = [dict(g) if g else {"error": "no_other_response"} for g in got]
    scores = [d.pop("score", math.nan) for d in details]
    return with_scores(rows, scores, details)


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
        """The comparisons run now (they need every response of a prompt at once); the returned Dataset is lazy.
        On Ray Data: a prompt's responses meet in a groupby, and so do its verdicts and then its win shares and
        responses (common.groups); the driver holds the counts."""
        from ray.data.aggregate import Sum

        rubric, tasks = self.rubric, dict(batch_format="pyarrow", num_cpus=TASK_CPUS)
        ds = ds.materialize()  # read twice: to list the comparisons, then to attach their scores
        blocks = max(1, ds.num_blocks())
        # Materialised before the engine starts and after it: no vLLM actor holds a CPU while a groupby runs.
        items = by_prompt(ds.select_columns([S.PROMPT_ID, S.SOURCE, S.RESPONSE]), _comparisons, blocks).materialize()

        def build(row):
            text = rubric.pairwise_prompt.format(source=row[S.SOURCE], a=row[_A], b=row[_B])
            return [{"role": "user", "content": text + VERDICT_FORMAT}]

        shares = None
        if items.count():  # else no prompt has two different responses: nothing to ask
            verdicts = (ask(items, self.llm, build=build, reply=Verdict, max_tokens=min(self.llm.max_tokens, 16))
                        .map_batches(_read_verdicts, **tasks).materialize())
            shares = by_prompt(verdicts, _shares, blocks).materialize()
        total = shares.aggregate(*(Sum(k) for k in _KINDS)) if shares is not None else {}
        kinds = {k: int(total.get(f"sum({k})") or 0) for k in _KINDS}
        readable = kinds["comparisons"] - kinds["unparseable"]
        self.pair_stats = {"comparisons": kinds["comparisons"], "consistent": readable - kinds["inconsistent"],
                           "inconsistent": kinds["inconsistent"], "unparseable": kinds["unparseable"],
                           "disagreement_rate": round(kinds["inconsistent"] / readable, 3) if readable else None}
        if shares is None:
            return ds.map_batches(_with_shares, **tasks)
        return by_prompt(with_rows_of(ds, shares), _with_shares, blocks)

    def summary(self, details: list[dict]) -> dict:
        if self.rubric.pairwise:
            return dict(self.pair_stats)
        ratings = [d["rating"] for d in details if d.get("rating") is not None]
        return {"mean_rating": round(sum(ratings) / len(ratings), 3) if ratings else None}
