"""The pairing rule and the filters, on hand-made candidates (no Ray, no model).

Worked example (quickstart numbers: threshold 0.6, margin 0.05, gap 3), candidates of one prompt as (score, words):
    a (0.85, 40)  b (0.80, 30)  c (0.50, 20)  d (0.83, 39)
    a-b: both >= 0.6 -> length: b is 10 words shorter -> b wins (gap 10)
    a-c: c < 0.6 -> quality: a is 0.35 higher -> a wins (gap 0.35)
    a-d: both faithful, 1 word apart < 3 -> tie, dropped
    b-c: quality -> b wins (gap 0.30);  b-d: length -> b wins (gap 9);  c-d: quality -> d wins (gap 0.33)
With max 3 pairs: the quality pairs by gap are a>c (0.35), d>c (0.33), b>c (0.30); the length pairs b>a (10),
b>d (9); alternating from the top, the kind drawn to lead for this prompt and seed (quality): a>c, b>a, d>c.
"""
import math
from collections import Counter

import pandas as pd
import pytest

from common import schema as S
from common.config import FilterConfig, JudgeConfig, PairingConfig
from common.errors import UserError
from common.filters import filter_reasons
from common.judges import score_range
from common.pairing import LENGTH, QUALITY, check_threshold, compare, decide, make_pairs, pair_id, pairs_for_prompt

QS = PairingConfig(quality_threshold=0.6, quality_margin=0.05, min_length_gap=3, max_pairs_per_prompt=3)
ANYSCALE = PairingConfig()  # quiz defaults: threshold 3 correct answers, margin 0, gap 3 words, 3 pairs


def row(text, score, words=None, pid="p1", k=0):
    words = len(text.split()) if words is None else words
    return {S.PROMPT_ID: pid, S.RESPONSE: text, S.SCORE: score, S.NUM_WORDS: words, S.CANDIDATE: k,
            S.PROMPT: [{"role": "user", "content": "Summarize: src"}], S.SOURCE: "src"}


def words(n, tag="w"):
    return " ".join(f"{tag}{i}" for i in range(n))


# ---------------------------------------------------------------- the rule for one pair
def test_below_threshold_higher_quality_wins():
    assert decide(0.9, 80, 0.5, 10, QS) == (1, QUALITY)  # longer, but the other is unfaithful
    assert decide(0.5, 10, 0.9, 80, QS) == (-1, QUALITY)
    assert decide(2, 10, 4, 50, ANYSCALE) == (-1, QUALITY)  # Anyscale: fewer than 3 correct -> more correct wins


def test_margin_makes_small_quality_gaps_ties():
    assert decide(0.58, 10, 0.55, 40, QS) == (0, QUALITY)  # 0.03 < margin 0.05
    assert decide(0.60, 40, 0.55, 10, QS) == (1, QUALITY)  # 0.05 >= margin
    assert decide(2, 10, 2, 40, ANYSCALE) == (0, QUALITY)  # equal quality below threshold: tie, not length


def test_both_faithful_shorter_wins_by_gap():
    assert decide(0.7, 40, 0.9, 43, QS) == (1, LENGTH)  # 3 words shorter wins, though less similar
    assert decide(0.7, 40, 0.9, 42, QS) == (0, LENGTH)  # 2 < gap: tie
    assert decide(0.9, 40, 0.7, 40, QS) == (0, LENGTH)  # same length: tie whatever the scores
    assert decide(3, 50, 5, 20, ANYSCALE) == (-1, LENGTH)
    assert decide(0.6, 20, 0.6, 30, QS) == (1, LENGTH)  # exactly at the threshold counts as faithful


def test_max_score_drop_keeps_the_shorter_from_winning_on_lost_faithfulness():
    drop = QS.model_copy(update={"max_score_drop": 0.02})
    assert decide(0.80, 30, 0.85, 40, QS) == (1, LENGTH)  # Anyscale's rule: shorter wins, whatever it lost
    assert decide(0.80, 30, 0.85, 40, drop) == (-1, QUALITY)  # lost 0.05 > 0.02: the more faithful wins
    assert decide(0.84, 30, 0.85, 40, drop) == (1, LENGTH)  # lost 0.01: still the shorter
    assert decide(0.90, 30, 0.85, 40, drop) == (1, LENGTH)  # shorter and more faithful
    assert compare(0.85, 40, 0.80, 30, drop) == 1  # symmetric


def test_zero_gap_means_strictly_shorter():
    cfg = QS.model_copy(update={"min_length_gap": 0})
    assert decide(0.7, 39, 0.7, 40, cfg) == (1, LENGTH)
    assert decide(0.7, 40, 0.7, 40, cfg) == (0, LENGTH)


def test_nan_never_wins():
    assert compare(math.nan, 10, 0.9, 50, QS) == 0
    assert compare(0.9, 10, math.nan, 50, QS) == 0


# ---------------------------------------------------------------- pairs of one prompt
def test_worked_example_from_the_docstring():
    a, b, c, d = (row("a " + words(39), 0.85), row("b " + words(29), 0.80), row("c " + words(19), 0.50),
                  row("d " + words(38), 0.83))
    kept, counts = pairs_for_prompt([a, b, c, d], QS, seed=0)
    got = [(p["chosen"][S.RESPONSE][0], p["rejected"][S.RESPONSE][0], p["kind"]) for p in kept]
    assert got == [("a", "c", QUALITY), ("b", "a", LENGTH), ("d", "c", QUALITY)]
    assert counts == {"ties_dropped": 1, "identical_skipped": 0, "over_cap": 2}


def test_identical_texts_are_never_paired():
    a, b = row("the same summary text here", 0.9), row("the  same summary\ntext here ", 0.5)
    kept, counts = pairs_for_prompt([a, b], QS, seed=0)
    assert kept == [] and counts["identical_skipped"] == 1


def test_cap_keeps_largest_gaps():
    rows = [row(words(n, f"t{n}"), 0.8, k=n) for n in (10, 20, 30, 40, 50)]
    kept, counts = pairs_for_prompt(rows, QS, seed=0)
    assert [(p["chosen"][S.NUM_WORDS], p["rejected"][S.NUM_WORDS]) for p in kept] == [(10, 50), (10, 40), (20, 50)]
    assert counts["over_cap"] == 10 - 3


def test_selection_is_deterministic_and_order_free():
    rows = [row(words(10 + 5 * (k % 2), f"r{k}"), 0.8, k=k) for k in range(6)]  # many equal gaps
    key = lambda kept: [(p["chosen"][S.RESPONSE], p["rejected"][S.RESPONSE]) for p in kept]  # noqa: E731
    first = key(pairs_for_prompt(rows, QS, seed=0)[0])
    assert first == key(pairs_for_prompt(list(reversed(rows)), QS, seed=0)[0])
    assert len(first) == 3
    seeds = {tuple(key(pairs_for_prompt(rows, QS, seed=s)[0])) for s in range(8)}
    assert len(seeds) > 1  # the seed breaks ties between equal gaps


def test_under_a_cap_of_one_each_kind_leads_on_about_half_the_prompts():
    """Every prompt has a quality pair (a>c) and a length pair (b>a): with one pair a prompt, which one it keeps is
    drawn per prompt, fixed by (seed, prompt), so the length lesson is not left only the prompts without a quality
    pair."""
    cap1 = QS.model_copy(update={"max_pairs_per_prompt": 1})

    def kinds(seed):
        out = {}
        for i in range(40):
            rows = [row("a " + words(39), 0.85, pid=f"p{i}"), row("b " + words(29), 0.80, pid=f"p{i}", k=1),
                    row("c " + words(19), 0.50, pid=f"p{i}", k=2)]
            kept, counts = pairs_for_prompt(rows, cap1, seed)
            assert len(kept) == 1 and counts["over_cap"] == 2
            out[f"p{i}"] = kept[0]["kind"]
        return out

    first = kinds(0)
    assert 12 <= Counter(first.values())[LENGTH] <= 28, Counter(first.values())
    assert kinds(0) == first  # the same draw every run
    assert kinds(1) != first  # the seed draws again


def test_unscored_candidates_are_not_paired():
    kept, _ = pairs_for_prompt([row(words(10), math.nan), row(words(40, "x"), 0.9)], QS, seed=0)
    assert kept == []


# ---------------------------------------------------------------- make_pairs: TRL format and stats
def test_make_pairs_trl_rows_and_stats():
    df = pd.DataFrame([row(words(20), 0.8, pid="p1", k=0), row(words(30, "x"), 0.8, pid="p1", k=1),
                       row(words(20), 0.8, pid="p2", k=0), row(words(21, "y"), 0.8, pid="p2", k=1)])
    pairs, stats = make_pairs(df, QS, seed=0)
    assert len(pairs) == 1
    p = pairs[0]
    assert p[S.CHOSEN] == [{"role": "assistant", "content": words(20)}]
    assert p[S.REJECTED] == [{"role": "assistant", "content": words(30, "x")}]
    assert p[S.PROMPT] == [{"role": "user", "content": "Summarize: src"}]
    assert (p[S.CHOSEN_WORDS], p[S.REJECTED_WORDS], p[S.CHOSEN_SCORE]) == (20, 30, 0.8)
    assert p[S.PAIR_ID] == pair_id("p1", words(20), words(30, "x"))
    assert stats["pairs"] == 1 and stats["ties_dropped"] == 1 and stats["prompts"] == 2
    assert stats["prompts_with_pairs"] == 1 and stats["pairs_per_prompt_max"] == 1
    assert stats["chosen_minus_rejected_words_mean"] == -10


def test_threshold_outside_the_judges_scores_is_a_user_error():
    judge = JudgeConfig()  # similarity: cosine in -1..1
    with pytest.raises(UserError, match="quality_threshold=3 is outside"):
        check_threshold(judge, PairingConfig(quality_threshold=3), *score_range(judge), "x.yaml")
    check_threshold(judge, QS, *score_range(judge), "x.yaml")
    quiz = JudgeConfig(type="quiz")
    check_threshold(quiz, ANYSCALE, *score_range(quiz), "x.yaml")


# ---------------------------------------------------------------- filters
def test_filters_count_each_reason():
    texts = ["", "too short", words(8), words(8) + " <|im_end|>", words(8), words(8, "z") + " " + "x " * 300,
             "fine text with [brackets] here ok", words(8, "q")]
    df = pd.DataFrame([row(t, 0.8, k=i) for i, t in enumerate(texts)])
    reasons = filter_reasons(df, FilterConfig())
    assert Counter(r for r in reasons if r) == {"empty": 1, "too_short": 1, "too_long": 1, "invalid_chars": 2,
                                                "duplicate": 1}
    assert [t for t, r in zip(texts, reasons) if not r] == [words(8), words(8, "q")]


def test_duplicates_are_per_prompt_and_filters_can_be_off():
    df = pd.DataFrame([row(words(8), 0.8, pid="p1"), row(words(8), 0.8, pid="p2"),
                       row(words(8) + "  ", 0.8, pid="p2", k=1)])
    assert filter_reasons(df, FilterConfig()) == ["", "", "duplicate"]
    off = FilterConfig(min_words=0, invalid_chars="", drop_empty=False, drop_duplicates=False)
    assert filter_reasons(pd.DataFrame([row("", 0.1), row("a <b>", 0.1)]), off) == ["", ""]
