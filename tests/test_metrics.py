"""Stage-4 metrics (common/metrics.py) against values computed by hand."""
import numpy as np
import pytest

from common import metrics as M

INVALID = r"[<>{}\[\]|\\^~`#*_]|<\|"  # the quickstart's filters.invalid_chars


def words(n):
    """A text of exactly n whitespace-separated words."""
    return " ".join(["w"] * n)


# ---------------------------------------------------------------- empty input
@pytest.mark.parametrize("call, name", [
    (lambda: M.compression([], []), "compression"),
    (lambda: M.length_violation([], 200, 5), "length_violation"),
    (lambda: M.share_invalid([], INVALID), "invalid_chars"),
    (lambda: M.win_rate([], 100, 0), "win_rate"),
    (lambda: M.judge_quality([], [3]), "judge_quality"),
])
def test_empty_input_raises(call, name):
    with pytest.raises(ValueError, match=f"{name}: got no"):
        call()


# ---------------------------------------------------------------- compression
def test_compression_two_pairs():
    """Responses of 2 and 4 words against sources of 10 and 8 words.

    ratios 2/10 = 0.2 and 4/8 = 0.5 -> mean = median = (0.2 + 0.5) / 2 = 0.35
    response words 2 and 4         -> mean = median = 3
    """
    out = M.compression(["a b", "a b c d"], [words(10), words(8)])
    assert out == pytest.approx(
        {"median_compression": 0.35, "mean_compression": 0.35, "mean_words": 3.0, "median_words": 3.0}
    )


def test_compression_mean_and_median_differ():
    """Responses of 1, 2 and 6 words, each against a 4-word source.

    ratios 1/4 = 0.25, 2/4 = 0.5, 6/4 = 1.5 -> median 0.5, mean (0.25 + 0.5 + 1.5) / 3 = 2.25 / 3 = 0.75
    words 1, 2, 6                           -> median 2,   mean 9 / 3 = 3
    Words are split on any whitespace: "  a\\tb\\n c  " has 3 words, so its ratio is 3/4 in the 2nd call.
    """
    out = M.compression(["a", "a b", "a b c d e f"], [words(4)] * 3)
    assert out == pytest.approx(
        {"median_compression": 0.5, "mean_compression": 0.75, "mean_words": 3.0, "median_words": 2.0}
    )
    assert M.compression(["  a\tb\n c  "], ["x y\tz\nw"])["mean_compression"] == 0.75


def test_compression_rejects_a_source_without_words():
    with pytest.raises(ValueError, match=r"position\(s\) \[1\] have no words"):
        M.compression(["a", "b"], ["x", "   "])


# ---------------------------------------------------------------- length_violation
def test_length_violation_bounds_are_inclusive():
    """Word counts 4, 5, 200, 201 with max_words=200, min_words=5 (the bounds themselves are allowed).

    too long:  only 201 > 200 -> 1/4 = 0.25
    too short: only 4 < 5     -> 1/4 = 0.25
    """
    out = M.length_violation([words(4), words(5), words(200), words(201)], max_words=200, min_words=5)
    assert out == {"share_too_long": 0.25, "share_too_short": 0.25}


def test_length_violation_other_bounds():
    """Word counts 1, 3, 4, 10.

    max_words=3, min_words=2 -> too long: 4 and 10 -> 2/4 = 0.5;  too short: 1 -> 1/4 = 0.25
    max_words=9, min_words=5 -> too long: 10 -> 0.25;  too short: 1, 3, 4 -> 0.75
    """
    responses = [words(1), words(3), words(4), words(10)]
    assert M.length_violation(responses, 3, 2) == {"share_too_long": 0.5, "share_too_short": 0.25}
    assert M.length_violation(responses, 9, 5) == {"share_too_long": 0.25, "share_too_short": 0.75}


def test_length_violation_rejects_min_above_max():
    with pytest.raises(ValueError, match="min_words"):
        M.length_violation(["a"], max_words=3, min_words=4)


# ---------------------------------------------------------------- share_invalid
def test_share_invalid_with_the_quickstart_pattern():
    """5 responses, 3 hit the pattern -> 3/5 = 0.6.

    clean:   ordinary punctuation , . ! ? : ; ' " ( ) - is allowed;  "ok"
    invalid: "**" (markdown),  "<|im_end|>" (chat-template token),  "[" and "]"
    """
    responses = [
        "Plain sentence, with (ordinary) punctuation: fine! 'quoted' \"too\"? yes; well-formed.",
        "Has **bold** text",
        "A summary.<|im_end|>",
        "see [1]",
        "ok",
    ]
    assert M.share_invalid(responses, INVALID) == 0.6


def test_share_invalid_custom_pattern_and_bad_regex():
    """pattern r"\\d" over "abc", "a1", "22" -> 2 of 3 contain a digit -> 2/3."""
    assert M.share_invalid(["abc", "a1", "22"], r"\d") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        M.share_invalid(["abc"], "[")


# ---------------------------------------------------------------- win_rate
def test_win_rate_three_wins_one_tie_one_loss():
    """Outcomes 1, 1, 1, 0.5, 0 -> 3 wins, 1 tie, 1 loss.

    win_rate = (3 + 0.5 * 1) / 5 = 3.5 / 5 = 0.7
    """
    out = M.win_rate([1, 1, 1, 0.5, 0], bootstrap_samples=1000, seed=0)
    assert (out["wins"], out["ties"], out["losses"], out["n"]) == (3, 1, 1, 5)
    assert out["win_rate"] == pytest.approx(0.7)
    assert out["ci_low"] <= 0.7 <= out["ci_high"]
    assert set(out) == {"win_rate", "wins", "ties", "losses", "ci_low", "ci_high", "n"}


def test_win_rate_without_bootstrap_has_no_interval():
    """Outcomes 0.5, 1, 1 -> (2 + 0.5) / 3 = 0.8333...; bootstrap_samples=0 -> no interval."""
    out = M.win_rate([0.5, 1, 1], bootstrap_samples=0, seed=0)
    assert (out["wins"], out["ties"], out["losses"]) == (2, 1, 0)
    assert out["win_rate"] == pytest.approx(2.5 / 3)
    assert out["ci_low"] is None and out["ci_high"] is None


def test_win_rate_all_ties_is_one_half():
    """All 4 prompts tie -> (0 + 0.5 * 4) / 4 = 0.5; every resample is all ties, so the CI is [0.5, 0.5]."""
    out = M.win_rate([0.5] * 4, bootstrap_samples=1000, seed=0)
    assert out["win_rate"] == 0.5 and out["ties"] == 4
    assert (out["ci_low"], out["ci_high"]) == (0.5, 0.5)


def test_win_rate_swapping_sides_mirrors_it():
    """Swapping model and baseline turns wins into losses: win_rate' = 1 - win_rate (3 wins, 1 tie, 1 loss -> 0.3)."""
    assert M.win_rate([0, 0, 0, 0.5, 1], bootstrap_samples=0, seed=0)["win_rate"] == pytest.approx(0.3)


def test_win_rate_bootstrap_is_deterministic_under_the_seed_and_follows_the_spec():
    """The CI is the 2.5/97.5 percentile of win rates over outcomes resampled with default_rng(seed)."""
    outcomes = [1.0, 1.0, 1.0, 0.5, 0.0] * 4
    a = M.win_rate(outcomes, bootstrap_samples=500, seed=7)
    b = M.win_rate(outcomes, bootstrap_samples=500, seed=7)
    assert (a["ci_low"], a["ci_high"]) == (b["ci_low"], b["ci_high"])
    assert a["win_rate"] == pytest.approx(0.7)
    assert a["ci_low"] <= a["win_rate"] <= a["ci_high"]

    # Independent re-statement of the procedure: resample prompt indices, take each resample's mean outcome.
    idx = np.random.default_rng(7).integers(0, 20, size=(500, 20))
    low, high = np.percentile(np.array(outcomes)[idx].mean(axis=1), [2.5, 97.5])
    assert (a["ci_low"], a["ci_high"]) == pytest.approx((low, high))


def test_win_rate_ci_narrows_with_more_prompts():
    """Same 3-win/1-tie/1-loss mix (win_rate 0.7) on 5 and on 500 prompts: the CI shrinks roughly as 1/sqrt(n)."""
    small = M.win_rate([1, 1, 1, 0.5, 0], bootstrap_samples=400, seed=0)
    large = M.win_rate([1, 1, 1, 0.5, 0] * 100, bootstrap_samples=400, seed=0)
    assert large["win_rate"] == pytest.approx(0.7)
    assert large["ci_low"] <= 0.7 <= large["ci_high"]
    assert large["ci_high"] - large["ci_low"] < (small["ci_high"] - small["ci_low"]) / 4


def test_win_rate_all_wins_gives_a_degenerate_ci():
    out = M.win_rate([1, 1], bootstrap_samples=1000, seed=0)
    assert (out["win_rate"], out["ci_low"], out["ci_high"]) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("outcomes, samples, message", [
    ([1.0, float("nan")], 10, r"outcome\(s\) at position\(s\) \[1\]"),
    ([1.0, 0.7], 10, r"outcome\(s\) at position\(s\) \[1\]"),  # a score, not a verdict
    ([1.0], -1, "bootstrap_samples"),
    ([1.0], 2.5, "bootstrap_samples"),
])
def test_win_rate_rejects_bad_input(outcomes, samples, message):
    with pytest.raises(ValueError, match=message):
        M.win_rate(outcomes, bootstrap_samples=samples, seed=0)


# ---------------------------------------------------------------- judge_quality
def test_judge_quality_two_thresholds():
    """scores 1, 3, 4, 5.

    mean = 13 / 4 = 3.25;  median = (3 + 4) / 2 = 3.5
    >= 3: 3, 4, 5 -> 3/4 = 0.75;  >= 4: 4, 5 -> 2/4 = 0.5
    """
    out = M.judge_quality([1, 3, 4, 5], thresholds=[3, 4])
    assert out == {"mean_score": 3.25, "median_score": 3.5, "share_at_least_3": 0.75, "share_at_least_4": 0.5}


def test_judge_quality_threshold_keys_drop_a_trailing_zero():
    """scores 1, 3, 4, 5 with thresholds 2.5 and 5.0: >= 2.5 -> 3/4; >= 5 -> 1/4; keys ..._2.5 and ..._5."""
    out = M.judge_quality([1, 3, 4, 5], thresholds=[2.5, 5.0])
    assert out == {"mean_score": 3.25, "median_score": 3.5, "share_at_least_2.5": 0.75, "share_at_least_5": 0.25}
    assert M.threshold_key(0.62) == "share_at_least_0.62"


def test_judge_quality_rejects_nan():
    with pytest.raises(ValueError, match="non-finite"):
        M.judge_quality([1.0, float("nan")], thresholds=[3])
