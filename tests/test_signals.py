"""The stage-4 signals beside the training judge (common/metrics.py, common/report.py) and stage 2's filter warning,
against values computed by hand. No Ray; the embedding test loads the embedded MiniLM on the driver."""
import math

import numpy as np
import pandas as pd
import pytest

from common import metrics as M
from common import report
from common import schema as S
from common.config import FilterConfig, JudgeConfig, PairingConfig, resolve
from common.filters import filter_warnings


# ---------------------------------------------------------------- copying
def test_copy_share_by_hand():
    """Source "the cat sat on the mat today" (4-grams: the-cat-sat-on, cat-sat-on-the, sat-on-the-mat,
    on-the-mat-today).
    r1 "The cat sat on the mat." -> 3 4-grams, all in the source (case and punctuation dropped) -> 1.0
    r2 "the cat sat on a red mat" -> 4 4-grams, only the-cat-sat-on in the source          -> 0.25
    r3 "a dog"                    -> no 4-gram: left out, counted in copy_too_short
    copy_share = (1.0 + 0.25) / 2 = 0.625; near-verbatim (> 0.8): r1 only -> 1/2
    """
    src = "the cat sat on the mat today"
    out = M.copy_share(["The cat sat on the mat.", "the cat sat on a red mat", "a dog"], [src] * 3)
    assert out == {"copy_share": 0.625, "share_near_verbatim": 0.5, "copy_too_short": 1}


def test_copy_share_counts_repeats_and_other_n():
    """r = "a b a b a" against source "a b a": bigrams a-b, b-a, a-b, b-a all in {a-b, b-a} -> 1.0 with n=2;
    with n=3 the 3-grams a-b-a, b-a-b, a-b-a: a-b-a twice in the source's {a-b-a} -> 2/3."""
    assert M.copy_share(["a b a b a"], ["a b a"], n=2)["copy_share"] == 1.0
    assert M.copy_share(["a b a b a"], ["a b a"], n=3)["copy_share"] == pytest.approx(2 / 3)


def test_copy_share_nothing_long_enough_is_none():
    assert M.copy_share(["a b"], ["a b"]) == {"copy_share": None, "share_near_verbatim": None, "copy_too_short": 1}
    with pytest.raises(ValueError, match="copy_share: got no"):
        M.copy_share([], [])


# ---------------------------------------------------------------- ROUGE-L
def test_rouge_l_by_hand():
    """"the cat sat" vs reference "the cat was sitting": stemmed, sitting -> sit, sat stays sat; the longest common
    subsequence is "the cat" (2): P = 2/3, R = 2/4, F1 = 2PR / (P + R) = (2/3) / (7/6) = 4/7.
    Identical texts give 1, disjoint ones 0: mean over the three = (4/7 + 1 + 0) / 3."""
    assert M.rouge_l(["the cat sat"], ["the cat was sitting"]) == pytest.approx(4 / 7)
    got = M.rouge_l(["the cat sat", "a b c", "x y"], ["the cat was sitting", "a b c", "p q"])
    assert got == pytest.approx((4 / 7 + 1 + 0) / 3)


# ---------------------------------------------------------------- embedding similarity
def test_embedding_similarity_by_hand():
    """Rows (1, 0) vs (1, 1): cos 1/sqrt 2; (0, 2) vs (0, 5): cos 1 -> mean (1/sqrt 2 + 1) / 2."""
    got = M.embedding_similarity(np.array([[1.0, 0], [0, 2]]), np.array([[1.0, 1], [0, 5]]))
    assert got == pytest.approx((1 / math.sqrt(2) + 1) / 2)
    with pytest.raises(ValueError, match="zero embedding"):
        M.embedding_similarity(np.zeros((1, 2)), np.ones((1, 2)))


def test_reference_similarity_uses_the_judges_minilm():
    """The real embedder of the similarity judge: a text is most similar to itself."""
    embed = report.embedder(JudgeConfig())
    same = M.embedding_similarity(embed(["A parser for Czech."]), embed(["A parser for Czech."]))
    other = M.embedding_similarity(embed(["A parser for Czech."]), embed(["Bananas grow in the tropics."]))
    assert same == pytest.approx(1.0, abs=1e-5) and other < 0.5


# ---------------------------------------------------------------- length-controlled win rate
def test_lc_win_rate_at_zero_length_difference_by_hand():
    """10 prompts where the model is 5 words longer: 8 wins, 2 losses; 10 where it is 5 shorter: 5 wins, 5 losses.
    d = +-5 exactly, sd(d) = 5, so x = tanh(+-1) takes two values and the logistic model fits both groups exactly:
    sigmoid(a + b x) = 0.8 and sigmoid(a - b x) = 0.5  ->  a = (logit 0.8 + logit 0.5) / 2 = ln(4) / 2
    lc_win_rate = sigmoid(ln 2) = 2/3, above the plain win rate 13/20 = 0.65 (the wins came despite length)."""
    y = [1] * 8 + [0] * 2 + [1] * 5 + [0] * 5
    d = [5] * 10 + [-5] * 10
    out = M.length_controlled_win_rate(y, d, bootstrap_samples=200, seed=0, ridge=1e-8)
    assert out["lc_win_rate"] == pytest.approx(2 / 3, abs=1e-6)
    assert out["length_coef"] > 0 and out["n"] == 20
    assert out["ci_low"] < 2 / 3 < out["ci_high"]
    again = M.length_controlled_win_rate(y, d, bootstrap_samples=200, seed=0, ridge=1e-8)
    assert again == out  # same seed, same interval


def test_lc_win_rate_without_length_differences_is_the_win_rate():
    """Every d = 0: the fit is the intercept alone, sigmoid(a) = mean outcome (1 + 1 + 0 + 0.5) / 4 = 0.625."""
    out = M.length_controlled_win_rate([1, 1, 0, 0.5], [0, 0, 0, 0], bootstrap_samples=0, seed=0, ridge=1e-8)
    assert out["lc_win_rate"] == pytest.approx(0.625, abs=1e-6) and out["ci_low"] is None


def test_lc_win_rate_when_only_shortness_wins():
    """Every shorter answer wins, every longer one loses, symmetrically: at equal length, 50%."""
    out = M.length_controlled_win_rate([1, 1, 1, 0, 0, 0], [-3, -2, -1, 1, 2, 3], bootstrap_samples=50, seed=0)
    assert out["lc_win_rate"] == pytest.approx(0.5, abs=1e-6) and out["length_coef"] < 0
    with pytest.raises(ValueError, match="outcomes must be"):
        M.length_controlled_win_rate([2], [0], 0, 0)


# ---------------------------------------------------------------- the report's signals, from a handmade table
def _table():
    """Two prompts; the reference is judged like a model. Pairing: threshold 0.6, length gap 3.
    p1: ref 0.9 / 10 words, sft 0.8 / 20 words, dpo 0.8 / 12 words (dpo copies the source)
    p2: ref 0.5 / 10 words, sft 0.9 / 20 words, dpo 0.9 / 21 words
    ref vs sft: p1 both >= 0.6, ref 10 shorter -> ref preferred; p2 ref < 0.6, sft higher -> sft -> preferred 1/2
    dpo vs sft: p1 8 words shorter -> win; p2 1 word apart -> tie -> win rate 0.75"""
    src = "we present a new parser for czech that beats the best previous parser by two points"
    rows = []
    for pid, sys, score, words, text in [
            ("p1", report.REFERENCE_SYSTEM, 0.9, 10, "a czech parser"), ("p1", "sft", 0.8, 20, "a parser for czech"),
            ("p1", "dpo", 0.8, 12, src), ("p2", report.REFERENCE_SYSTEM, 0.5, 10, "a czech parser"),
            ("p2", "sft", 0.9, 20, "a parser for czech"), ("p2", "dpo", 0.9, 21, "a new parser for czech")]:
        rows.append({S.PROMPT_ID: pid, S.SYSTEM: sys, S.SCORE: score, S.NUM_WORDS: words, S.RESPONSE: text,
                     S.SOURCE: src, S.REFERENCE: "a czech parser", S.FINISH_REASON: "stop"})
    return pd.DataFrame(rows)


def test_report_signals_and_bars_from_a_table():
    pairing = PairingConfig(quality_threshold=0.6, min_length_gap=3)
    judge, filters = JudgeConfig(), FilterConfig(min_words=1, invalid_chars="")
    fake_embed = lambda texts: np.array([[1.0, len(t)] for t in texts])  # noqa: E731 (a stand-in, no model)
    m = report.compute(_table(), ["dpo", "sft"], "sft", judge, filters, pairing, 50, 0, fake_embed)
    sft, dpo = m["models"]["sft"], m["models"]["dpo"]
    assert sft["judge_vs_reference"]["preferred"] == 0.5 and sft["judge_vs_reference"]["wins"] == 1
    assert m["win_rate"]["dpo"]["win_rate"] == 0.75 and m["win_rate"]["dpo"]["length_controlled"]["n"] == 2
    # dpo's answers are runs of the source (all 4-grams found); sft's "a parser for czech" is not in it
    assert (dpo["copy_share"], dpo["share_near_verbatim"], sft["copy_share"]) == (1.0, 1.0, 0.0)
    assert sft["rouge_l"] == pytest.approx(M.rouge_l(["a parser for czech"], ["a czech parser"]))
    assert sft["n_with_reference"] == 2 and sft["reference_similarity"] is not None
    checks = dict((c.split(" (")[0], ok) for c, ok in report.target_check(m, "dpo", 0.7, 0.02))
    assert checks["ROUGE-L vs human not lower than sft"] is False  # the copy is further from the human summary
    assert checks["copy share not higher than sft"] is False
    rows = {r[0]: r[1:] for r in report.table_rows(m, judge, filters, pairing, ["dpo", "sft"])}
    assert "ROUGE-L F1 vs human reference" in rows and "judge prefers human reference over this model" in rows
    # p1: both faithful, dpo 8 words shorter -> a win on length; p2: both faithful, 1 word apart -> a tie on length
    assert m["win_rate"]["dpo"]["by_branch"] == {"length": {"wins": 1, "ties": 1, "losses": 0}}
    assert rows["... decided on score · on length"] == ["0 / 0 / 0 · 1 / 1 / 0", "—"]


def _bar_metrics(win_rate, ci_low, ci_high):
    return {"baseline": "sft", "win_rate": {"dpo": {"win_rate": win_rate, "ci_low": ci_low, "ci_high": ci_high}},
            "models": {"dpo": {"rouge_l": 0.25, "copy_share": 0.3}, "sft": {"rouge_l": 0.24, "copy_share": 0.4}}}


@pytest.mark.parametrize("win_rate, ci_low, ci_high, passes", [
    (0.72, 0.52, 0.90, True),   # over the bar, the interval clear of a coin flip
    (0.72, 0.48, 0.92, False),  # over the bar on too few prompts: the lower end is not above 50%
    (0.72, 0.50, 0.92, False),  # "above", not "at"
    (0.68, 0.60, 0.76, False),  # clear of a coin flip but under the bar
    (0.70, None, None, True),   # no bootstrap (bootstrap_samples: 0): the rate alone
])
def test_the_win_rate_bar_asks_for_the_interval_too(win_rate, ci_low, ci_high, passes):
    (text, ok), *_ = report.target_check(_bar_metrics(win_rate, ci_low, ci_high), "dpo", 0.7, 0.02)
    assert ok is passes and text.startswith("win rate vs sft >= 70%")
    assert ("95% CI above 50%" in text) is (ci_low is not None)


def test_the_sweep_grades_a_point_with_the_reports_bar():
    """benchmarks/sweep_recipe.py reads the same three checks as stage 4's report, not its own copy of them."""
    from benchmarks.sweep_recipe import bar
    assert bar(_bar_metrics(0.72, 0.52, 0.90)) == {"win_rate": True, "rouge_l": True, "copy_share": True}
    assert bar(_bar_metrics(0.72, 0.48, 0.92))["win_rate"] is False


def test_without_references_the_reference_signals_are_left_out():
    df = _table()
    df = df[df[S.SYSTEM] != report.REFERENCE_SYSTEM].assign(**{S.REFERENCE: ""})
    m = report.compute(df, ["dpo", "sft"], "sft", JudgeConfig(), FilterConfig(min_words=1, invalid_chars=""),
                       PairingConfig(quality_threshold=0.6), 10, 0)
    assert m["models"]["sft"]["rouge_l"] is None and m["models"]["sft"]["judge_vs_reference"] == {}
    assert not any(c.startswith("ROUGE-L") for c, _ in report.target_check(m, "dpo", 0.7, 0.02))
    assert any(c.startswith("copy share") for c, _ in report.target_check(m, "dpo", 0.7, 0.02))
    assert "ROUGE" not in " ".join(report.signals(JudgeConfig(), "rule", False)["not_trained_on"])


# ---------------------------------------------------------------- stage 2's filter warning
def test_a_filter_removing_more_than_a_quarter_warns_with_its_key():
    """1000 candidates: invalid_chars removed 590 (59%), too_long 250 (exactly 25%: not more), duplicate 10."""
    warnings = filter_warnings({"invalid_chars": 590, "too_long": 250, "duplicate": 10}, 1000)
    assert len(warnings) == 1
    w = warnings[0]
    assert "`invalid_chars`" in w and "59%" in w and "590 of 1000" in w and "filters.invalid_chars" in w
    assert filter_warnings({"too_short": 26}, 100)[0].count("filters.min_words") == 1
    assert filter_warnings({}, 0) == [] and filter_warnings({"empty": 1}, 100) == []
