"""The pairing rule: scored candidates -> (chosen, rejected) pairs. Anyscale's rule, on the judge's SCORE:

    if either candidate scores below `quality_threshold`:
        the higher score wins, if higher by at least `quality_margin` (and by more than 0)    -> "quality" pair
    else:
        the shorter wins, if shorter by at least `min_length_gap` words (and by at least 1)   -> "length" pair
    anything else is a tie and is dropped; identical texts (up to whitespace) are never paired.

At most `max_pairs_per_prompt` pairs per prompt are kept: the largest gaps first (score gap for quality pairs, word
gap for length pairs), alternating between the two kinds so both lessons survive the cap, and equal gaps ordered by
a hash of (seed, pair), so the choice is deterministic and independent of row order. Which kind leads is drawn per
prompt by a hash of (seed, prompt): under a cap of 1, the prompts that have both kinds teach each about half the time
(quality first everywhere would leave the length lesson only the prompts without a quality pair).

`compare` is the same rule for one (a, b): stage 4 uses it for the win rate of a model against its baseline.
"""
from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from common import schema as S
from common.config import JudgeConfig, PairingConfig
from common.errors import UserError
from common.filters import normalize

QUALITY, LENGTH = "quality", "length"


def decide(a_score: float, a_words: int, b_score: float, b_words: int, cfg: PairingConfig) -> tuple[int, str]:
    """(+1 if a wins, -1 if b wins, 0 for a tie, and the branch: "quality" or "length"). NaN scores tie."""
    if math.isnan(a_score) or math.isnan(b_score):
        return 0, QUALITY
    if min(a_score, b_score) < cfg.quality_threshold:
        diff = a_score - b_score
        if abs(diff) > 0 and abs(diff) >= cfg.quality_margin - 1e-9:  # 0.60 - 0.55 is 0.04999... in floats
            return (1 if diff > 0 else -1), QUALITY
        return 0, QUALITY
    gap = b_words - a_words  # > 0: a is shorter
    if abs(gap) >= max(cfg.min_length_gap, 1):
        shorter_drop = (b_score - a_score) if gap > 0 else (a_score - b_score)
        if cfg.max_score_drop is not None and shorter_drop > cfg.max_score_drop:
            return (-1 if gap > 0 else 1), QUALITY  # shorter, but it lost too much: the more faithful wins
        return (1 if gap > 0 else -1), LENGTH
    return 0, LENGTH


def compare(a_score: float, a_words: int, b_score: float, b_words: int, cfg: PairingConfig) -> int:
    """+1 if the rule prefers a, -1 if it prefers b, 0 for a tie (NaN scores tie)."""
    return decide(a_score, a_words, b_score, b_words, cfg)[0]


def pairable(prompt_ids: Iterable[str], texts: Iterable[str]) -> bool:
    """Whether any prompt has two different texts: without one, no judge can make a pair."""
    seen: dict[str, str] = {}
    for pid, text in zip(prompt_ids, texts):
        t = normalize(text)
        if seen.setdefault(pid, t) != t:
            return True
    return False


def _tiebreak(seed: int, *parts: Any) -> int:
    return int(hashlib.sha1("\x1f".join(map(str, (seed, *parts))).encode()).hexdigest()[:12], 16)


def pair_id(prompt_id: str, chosen: str, rejected: str) -> str:
    """Stable across reruns: a hash of the prompt id and both texts."""
    return hashlib.sha1(f"{prompt_id}\x1f{chosen}\x1f{rejected}".encode()).hexdigest()[:16]


def _select(decided: list[dict], cap: int, seed: int, prompt_id: str) -> list[dict]:
    kinds = {QUALITY: [], LENGTH: []}
    for p in decided:
        kinds[p["kind"]].append(p)
    for ps in kinds.values():
        ps.sort(key=lambda p: (-p["gap"], _tiebreak(seed, p["key"])))
    q, ln = kinds[QUALITY], kinds[LENGTH]
    a, b = (q, ln) if _tiebreak(seed, prompt_id) % 2 else (ln, q)  # the kind that leads: drawn per prompt
    merged = [p for pair in zip(a, b) for p in pair] + a[len(b):] + b[len(a):]
    return merged[:cap]


def pairs_for_prompt(rows: list[dict], cfg: PairingConfig, seed: int) -> tuple[list[dict], dict[str, int]]:
    """One prompt's candidates (dicts with RESPONSE, SCORE, NUM_WORDS) -> (winner/loser dicts, counts)."""
    counts = dict(ties_dropped=0, identical_skipped=0, over_cap=0)
    rows = [r for r in rows if r[S.SCORE] is not None and not math.isnan(float(r[S.SCORE]))]  # unparseable (NaN,
    # or null once Arrow has read it from pandas): never paired
    decided = []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            a, b = rows[i], rows[j]
            if normalize(a[S.RESPONSE]) == normalize(b[S.RESPONSE]):
                counts["identical_skipped"] += 1
                continue
            verdict, kind = decide(float(a[S.SCORE]), int(a[S.NUM_WORDS]), float(b[S.SCORE]), int(b[S.NUM_WORDS]),
                                   cfg)
            if verdict == 0:
                counts["ties_dropped"] += 1
                continue
            win, lose = (a, b) if verdict > 0 else (b, a)
            gap = (float(win[S.SCORE]) - float(lose[S.SCORE]) if kind == QUALITY
                   else int(lose[S.NUM_WORDS]) - int(win[S.NUM_WORDS]))
            decided.append(dict(chosen=win, rejected=lose, kind=kind, gap=gap,
                                key=(win[S.RESPONSE], lose[S.RESPONSE])))
    kept = _select(decided, cfg.max_pairs_per_prompt, seed, rows[0][S.PROMPT_ID] if rows else "")
    counts["over_cap"] = len(decided) - len(kept)
    return kept, counts


def _messages(value: Any) -> list[dict[str, str]]:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
# Stage 2's pair rows: TRL's conversational preference format plus where each pair came from.
PAIR_SCHEMA = pa.schema([(S.PAIR_ID, pa.string()), (S.PROMPT_ID, pa.string()), (S.PROMPT, _MESSAGES),
                         (S.CHOSEN, _MESSAGES), (S.REJECTED, _MESSAGES), (S.SOURCE, pa.string()),
                         (S.CHOSEN_SCORE, pa.float64()), (S.REJECTED_SCORE, pa.float64()),
                         (S.CHOSEN_WORDS, pa.int64()), (S.REJECTED_WORDS, pa.int64()), (S.DECIDED_BY, pa.string())])


def trl_row(prompt_id: str, pair: dict) -> dict:
    """One pair of `pairs_for_prompt` as a row of PAIR_SCHEMA."""
    c, r = pair["chosen"], pair["rejected"]
    return {
        S.PAIR_ID: pair_id(prompt_id, c[S.RESPONSE], r[S.RESPONSE]),
        S.PROMPT_ID: prompt_id,
        S.PROMPT: _messages(c[S.PROMPT]),
        S.CHOSEN: [{"role": "assistant", "content": c[S.RESPONSE]}],
        S.REJECTED: [{"role": "assistant", "content": r[S.RESPONSE]}],
        S.SOURCE: c[S.SOURCE],
        S.CHOSEN_SCORE: float(c[S.SCORE]), S.REJECTED_SCORE: float(r[S.SCORE]),
        S.CHOSEN_WORDS: int(c[S.NUM_WORDS]), S.REJECTED_WORDS: int(r[S.NUM_WORDS]),
        S.DECIDED_BY: pair["kind"],
    }


def make_pairs(scored: pd.DataFrame, cfg: PairingConfig, seed: int) -> tuple[list[dict], dict[str, Any]]:
    """Scored, filtered candidates -> TRL conversational preference rows (see common.schema) and pairing stats,
    in memory: the rule on a small table (tests, notebooks). Stage 2 runs the same rule per prompt on Ray Data
    (common.per_prompt). Candidates with a NaN score (the judge's output was unparseable) are never paired."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in scored.to_dict("records"):
        groups[r[S.PROMPT_ID]].append(r)
    out, totals, most = [], defaultdict(float), 0
    for pid in sorted(groups):
        kept, counts = pairs_for_prompt(groups[pid], cfg, seed)
        rows = [trl_row(pid, p) for p in kept]
        for k, v in prompt_totals(rows, counts).items():
            totals[k] += v
        most = max(most, len(rows))
        out.extend(rows)
    return out, pair_stats(totals, len(groups), most)


SKIPS = ("ties_dropped", "identical_skipped", "over_cap")  # what pairs_for_prompt counts besides the pairs


def prompt_totals(rows: list[dict], counts: dict[str, int]) -> dict[str, float]:
    """One prompt's pair rows and skip counts as the sums `pair_stats` needs (summed over prompts, in memory or as
    Ray Data aggregates: common.per_prompt)."""
    return {"pairs": len(rows), QUALITY: sum(p[S.DECIDED_BY] == QUALITY for p in rows),
            LENGTH: sum(p[S.DECIDED_BY] == LENGTH for p in rows), "with_pairs": int(bool(rows)),
            **{k: counts[k] for k in SKIPS},
            "words_gap": sum(p[S.CHOSEN_WORDS] - p[S.REJECTED_WORDS] for p in rows),
            "score_gap": float(sum(p[S.CHOSEN_SCORE] - p[S.REJECTED_SCORE] for p in rows))}


def pair_stats(totals: dict[str, float], prompts: int, most: int) -> dict[str, Any]:
    """The manifest's pairing stats from the prompts' summed `prompt_totals`, the number of prompts and the most
    pairs any one prompt gave."""
    n, with_pairs = int(totals["pairs"]), int(totals["with_pairs"])
    stats = {"pairs": n, "pairs_by_rule": {QUALITY: int(totals[QUALITY]), LENGTH: int(totals[LENGTH])},
             **{k: int(totals[k]) for k in SKIPS}, "prompts": prompts, "prompts_with_pairs": with_pairs,
             "pairs_per_prompt_mean": round(n / with_pairs, 2) if with_pairs else 0.0, "pairs_per_prompt_max": most}
    if n:
        stats["chosen_minus_rejected_words_mean"] = round(totals["words_gap"] / n, 2)
        stats["chosen_minus_rejected_score_mean"] = round(totals["score_gap"] / n, 4)
    return stats


def check_threshold(judge: JudgeConfig, pairing: PairingConfig, lo: float, hi: float, where: str) -> None:
    """A threshold outside the judge's score range makes every pair a quality pair (or none): say so, early."""
    t = pairing.quality_threshold
    if not lo < t <= hi:
        unit = {"similarity": "a cosine similarity", "quiz": "correct answers",
                "rubric": "a win share" if judge.rubric.pairwise else "a rating"}.get(judge.type, "a score")
        hint = 0.7 if judge.type == "similarity" else round(lo + 0.6 * (hi - lo), 1)
        raise UserError(f"{where}: pairing.quality_threshold={t:g} is outside the {judge.type} judge's scores "
                        f"({unit}, {lo:g}..{hi:g}); set it inside, e.g. --set pairing.quality_threshold={hint:g}")


def summarize(values: Iterable[float]) -> dict[str, float]:
    v = np.sort(np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64))
    v = v[~np.isnan(v)]
    if not v.size:
        return {}
    return {"mean": round(float(v.mean()), 4), "min": round(float(v[0]), 4), "median": round(float(v[v.size // 2]), 4),
            "max": round(float(v[-1]), 4)}


def holdout_rank(seed: int, prompt_id: str) -> int:
    """Where a prompt stands in the validation holdout: the lowest ranks are held out (a 48-bit hash)."""
    return _tiebreak(seed, "valid", prompt_id)


def holdout_count(prompts: int, fraction: float) -> int:
    """How many of `prompts` (with pairs) are held out: a non-zero fraction holds out at least one and always
    leaves one to train on."""
    if fraction <= 0 or prompts < 2:
        return 0
    return min(prompts - 1, max(1, round(fraction * prompts)))


def split_valid(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, valid): the pairs of `fraction` of the prompts held out for validation, chosen by a hash of (seed,
    prompt id), so the split is deterministic, independent of row order, and a prompt's pairs are all on one side.
    In memory; stage 2 makes the same split on Ray Data (common.per_prompt.holdout_cutoff)."""
    prompts = sorted({p[S.PROMPT_ID] for p in pairs})
    k = holdout_count(len(prompts), fraction)
    held = set(sorted(prompts, key=lambda pid: holdout_rank(seed, pid))[:k])
    return [p for p in pairs if p[S.PROMPT_ID] not in held], [p for p in pairs if p[S.PROMPT_ID] in held]
