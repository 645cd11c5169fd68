"""Stage 4's metrics: plain functions over lists, each returning the keys it adds to metrics.json.

Words are whitespace words (str.split()), as everywhere in the cookbook. Every function raises ValueError on input
it cannot summarise (nothing to summarise, a NaN score, a bad regex) instead of returning a number that means
nothing; common.report leaves unjudged responses out before calling them.
"""
from __future__ import annotations

import re
import statistics
from typing import Any, Sequence

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


# ---------------------------------------------------------------- signals the training judge did not give
# A response copies its source when its runs of words are the source's. Four words: single words and pairs are
# shared by any faithful summary (the paper's technical terms), while a run of four rarely recurs by chance, so
# 4-gram overlap separates paraphrase from copy (the "novel n-grams" analysis of See et al. 2017 and Grusky et al.
# 2018, Newsroom, uses fragments of this size).
COPY_NGRAM = 4
# Above this share of its 4-grams found in the source, a response counts as a near-verbatim copy: a response that
# paraphrases even one clause in five stays below it.
NEAR_VERBATIM = 0.8


def _tokens(text: str) -> list[str]:
    """Lower-cased word tokens, punctuation dropped, so "results." and "Results" are one word."""
    return re.findall(r"\w+", str(text or "").lower())


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def copy_fraction(response: str, source: str, n: int = COPY_NGRAM) -> float | None:
    """Share of `response`'s word n-grams (with repeats) found anywhere in `source`; None under n words. The
    per-response term of copy_share, and the similarity judge's copy penalty (common/judges/similarity.py)."""
    grams = _ngrams(_tokens(response), n)
    if not grams:
        return None
    seen = set(_ngrams(_tokens(source), n))
    return sum(g in seen for g in grams) / len(grams)


def copy_share(responses: Sequence[str], sources: Sequence[str], n: int = COPY_NGRAM,
               near_verbatim: float = NEAR_VERBATIM) -> dict[str, Any]:
    """How much of each response is copied from its source, by word n-grams (lower-cased \\w+ tokens).

        copy_i = (n-grams of response_i, with repeats, that occur anywhere in source_i) / (n-grams of response_i)
        copy_share = mean of copy_i;   share_near_verbatim = share of responses with copy_i > near_verbatim

    A response shorter than n words has no n-gram and is left out of both (counted in copy_too_short); with none
    left, both are None.
    """
    _nonempty("copy_share", responses)
    if len(responses) != len(sources):
        raise ValueError(f"copy_share: {len(responses)} responses but {len(sources)} sources")
    shares = [c for c in (copy_fraction(r, s, n) for r, s in zip(responses, sources)) if c is not None]
    return {"copy_share": float(np.mean(shares)) if shares else None,
            "share_near_verbatim": float(np.mean([x > near_verbatim for x in shares])) if shares else None,
            "copy_too_short": len(responses) - len(shares)}


def rouge_l(responses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 of each response against its reference: Google's `rouge_score` package (the implementation
    behind most published ROUGE numbers and Hugging Face's `rouge` metric), with its Porter stemmer."""
    from rouge_score import rouge_scorer

    _nonempty("rouge_l", responses)
    if len(responses) != len(references):
        raise ValueError(f"rouge_l: {len(responses)} responses but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(ref, r)["rougeL"].fmeasure for r, ref in zip(responses, references)]))


def embedding_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of row i of `a` with row i of `b` (embeddings, e.g. a response and its reference)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or len(a) == 0:
        raise ValueError(f"embedding_similarity: needs two non-empty (n, d) arrays of one shape, got {a.shape} "
                         f"and {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    if (norms == 0).any():
        raise ValueError("embedding_similarity: a zero embedding has no direction")
    return float(np.mean(np.einsum("ij,ij->i", a, b) / norms))


def _fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float, iters: int = 50) -> np.ndarray:
    """(a, b) minimising the cross-entropy of y (in [0, 1]; a tie is 0.5) against sigmoid(a + b x), plus
    ridge/2 (a^2 + b^2) so a perfect separation (every shorter answer won) stays finite. Newton's method."""
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(X @ w)))
        grad = X.T @ (p - y) + ridge * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def length_controlled_win_rate(outcomes: Sequence[float], length_diffs: Sequence[float], bootstrap_samples: int,
                               seed: int, ridge: float = 1e-2) -> dict[str, Any]:
    """The win rate the model would have if its answers were as long as the baseline's: a simpler equivalent of
    AlpacaEval 2's length-controlled win rate (Dubois et al. 2024), which fits a logistic model of the judge's
    preference with a length term and reports its prediction at zero length difference. Here, per prompt:

        P(win) = sigmoid(a + b * tanh(d / sd(d))),   d = words(model) - words(baseline)
        lc_win_rate = sigmoid(a)   (the prediction at d = 0)

    with ties counted as 0.5 (as in win_rate), tanh(d / sd) the bounded length feature AlpacaEval 2 uses, and a
    small ridge keeping (a, b) finite when length alone decides every match. When every d is 0 it is the plain win
    rate (up to the ridge). The 95% interval: the same prompt bootstrap as win_rate, refitting each resample.
    """
    _nonempty("length_controlled_win_rate", outcomes, "outcomes")
    y, d = np.asarray(outcomes, dtype=np.float64), np.asarray(length_diffs, dtype=np.float64)
    if y.shape != d.shape:
        raise ValueError(f"length_controlled_win_rate: {y.size} outcomes but {d.size} length differences")
    if not np.isin(y, (0.0, 0.5, 1.0)).all() or not np.isfinite(d).all():
        raise ValueError("length_controlled_win_rate: outcomes must be 1, 0.5 or 0 and length differences finite")
    if not ridge > 0:
        raise ValueError(f"length_controlled_win_rate: ridge must be > 0 (a resample may hold one length only), "
                         f"got {ridge}")
    sd = float(d.std())
    x = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)

    def lc(idx):
        return float(1 / (1 + np.exp(-_fit_logistic(x[idx], y[idx], ridge)[0])))

    rng = np.random.default_rng(seed)
    boot = [lc(rng.integers(0, y.size, y.size)) for _ in range(int(bootstrap_samples))]
    ci = [float(v) for v in np.percentile(boot, [2.5, 97.5])] if boot else [None, None]
    a, b = _fit_logistic(x, y, ridge)
    return {"lc_win_rate": float(1 / (1 + np.exp(-a))), "ci_low": ci[0], "ci_high": ci[1],
            "length_coef": float(b), "n": int(y.size)}
