"""Stage 4's metrics: plain functions over lists, each returning the keys it adds to metrics.json.

Words are whitespace words (str.split()), as everywhere in the cookbook. Every function raises ValueError on input
it cannot summarise (nothing to summarise, a NaN score, a bad regex) instead of returning a number that means
nothing; common.report leaves unjudged responses out before calling them.
"""
from __future__ import annotations

import re
import statistics
from typing import Sequence

import numpy as np

# Resample at most this many prompt indices at once, so the bootstrap's memory stays bounded for large n.
_MAX_DRAWS_PER_CHUNK = 2_000_000


def _nonempty(name: str, values: Sequence, what: str = "responses") -> None:
    if len(values) == 0:
        raise ValueError(f"{name}: got no {what}; pass at least one")


def compression(responses: Sequence[str], sources: Sequence[str]) -> dict[str, float]:
    """Response length relative to its source: compression_i = words(response_i) / words(source_i).

    Returns median_compression and mean_compression over the pairs, and median_words and mean_words of the
    responses. A 30-word summary of a 300-word source has compression 0.1. Every source needs a word.
    """
    _nonempty("compression", responses)
    words = [len(r.split()) for r in responses]
    source_words = [len(s.split()) for s in sources]
    empty = [i for i, n in enumerate(source_words) if n == 0]
    if empty:
        raise ValueError(f"compression: source(s) at position(s) {empty[:10]} have no words; compression is "
                         f"response words / source words, so every source needs at least one word")
    ratios = [w / s for w, s in zip(words, source_words)]
    return {"median_compression": float(statistics.median(ratios)), "mean_compression": float(statistics.fmean(ratios)),
            "mean_words": float(statistics.fmean(words)), "median_words": float(statistics.median(words))}


def length_violation(responses: Sequence[str], max_words: int, min_words: int) -> dict[str, float]:
    """share_too_long (> max_words words) and share_too_short (< min_words); a response at a bound is within it."""
    _nonempty("length_violation", responses)
    if min_words > max_words:
        raise ValueError(f"length_violation: min_words ({min_words}) is larger than max_words ({max_words})")
    words = [len(r.split()) for r in responses]
    return {"share_too_long": sum(w > max_words for w in words) / len(words),
            "share_too_short": sum(w < min_words for w in words) / len(words)}


def share_invalid(responses: Sequence[str], pattern: str) -> float:
    """The share of responses in which the regex `pattern` (stage 2's filters.invalid_chars) matches anywhere."""
    _nonempty("invalid_chars", responses)
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid_chars: pattern {pattern!r} is not a valid regular expression: {e}") from None
    return sum(regex.search(r) is not None for r in responses) / len(responses)


def threshold_key(t: float) -> str:
    """share_at_least_<t>, with t written without a trailing .0 (3.0 -> "3", 3.5 -> "3.5")."""
    t = float(t)
    return f"share_at_least_{int(t) if t.is_integer() else t}"


def judge_quality(scores: Sequence[float], thresholds: Sequence[float]) -> dict[str, float]:
    """mean_score, median_score and, per threshold t, share_at_least_<t> = share of scores >= t (higher is better).

    As in LLM-as-a-judge evaluations (Zheng et al. 2023, MT-Bench): absolute scores, summarised per model.
    """
    _nonempty("judge_quality", scores, "scores")
    s = np.asarray(scores, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise ValueError(f"judge_quality: non-finite score(s) at position(s) {bad[:10].tolist()}; "
                         f"drop or re-judge those responses first")
    out = {"mean_score": float(s.mean()), "median_score": float(np.median(s))}
    out.update({threshold_key(t): float(np.mean(s >= float(t))) for t in thresholds})
    return out


def win_rate(outcomes: Sequence[float], bootstrap_samples: int, seed: int) -> dict:
    """The win rate of per-prompt outcomes (1 win, 0.5 tie, 0 loss), with a percentile-bootstrap 95% interval.

        win_rate = (wins + 0.5 x ties) / n

    The interval (Efron 1979): draw n prompt indices with replacement (numpy.random.default_rng(seed)), take the
    win rate of the resample, repeat bootstrap_samples times; ci_low and ci_high are the 2.5th and 97.5th
    percentiles (numpy.percentile, linear interpolation). Same outcomes and seed, same interval.
    bootstrap_samples=0 computes no interval (ci_low = ci_high = None).
    """
    _nonempty("win_rate", outcomes, "outcomes")
    o = np.asarray(outcomes, dtype=np.float64)
    bad = np.flatnonzero(~np.isin(o, (0.0, 0.5, 1.0)))
    if bad.size:
        raise ValueError(f"win_rate: outcome(s) at position(s) {bad[:10].tolist()} are not 1 (win), 0.5 (tie) "
                         f"or 0 (loss); leave unjudged prompts out first")
    if int(bootstrap_samples) != bootstrap_samples or bootstrap_samples < 0:
        raise ValueError(f"win_rate: bootstrap_samples must be a whole number >= 0, got {bootstrap_samples}")
    n, wins, losses = int(o.size), int(np.sum(o == 1.0)), int(np.sum(o == 0.0))
    ties = n - wins - losses
    ci_low = ci_high = None
    if bootstrap_samples > 0:
        rng = np.random.default_rng(seed)
        boot = np.empty(int(bootstrap_samples), dtype=np.float64)
        rows_per_chunk = max(1, _MAX_DRAWS_PER_CHUNK // n)
        for start in range(0, len(boot), rows_per_chunk):
            stop = min(start + rows_per_chunk, len(boot))
            boot[start:stop] = o[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
        ci_low, ci_high = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    return {"win_rate": (wins + 0.5 * ties) / n, "wins": wins, "ties": ties, "losses": losses,
            "ci_low": ci_low, "ci_high": ci_high, "n": n}
