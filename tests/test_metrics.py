"""Stage-4 metrics (common/metrics) against values computed by hand, loaded offline from local paths."""
import os

# Before anything imports huggingface_hub/datasets/evaluate: they read these once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import common.metrics  # noqa: E402
from common.metrics import METRICS, load_metric  # noqa: E402

METRICS_DIR = Path(common.metrics.__file__).parent


def words(n):
    """A text of exactly n whitespace-separated words."""
    return " ".join(["w"] * n)


# ---------------------------------------------------------------- loading


def test_every_metric_folder_is_listed_and_has_a_same_named_script():
    folders = sorted(p.name for p in METRICS_DIR.iterdir() if p.is_dir() and not p.name.startswith("__"))
    assert folders == sorted(METRICS)
    for name in METRICS:
        assert (METRICS_DIR / name / f"{name}.py").is_file()


def test_local_load_makes_no_network_call(monkeypatch):
    """A fresh evaluate.load of each local folder (not the cached one) works with sockets disabled."""
    import evaluate

    def no_network(*args, **kwargs):
        raise AssertionError(f"network call during a local evaluate.load: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    for name in METRICS:
        module = evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)
        assert module.name == name
    out = module.compute(scores=[1, 5])  # the last one is judge_quality
    assert out["mean_score"] == 3.0


@pytest.mark.parametrize("name", METRICS)
def test_info_has_description_citation_inputs_and_features(name):
    module = load_metric(name)
    assert isinstance(module, __import__("evaluate").Metric)
    assert module.description.strip()
    assert module.citation.strip()
    assert "Returns:" in module.inputs_description
    assert len(module.features) >= 1


def test_load_metric_caches_and_rejects_unknown_names():
    assert load_metric("win_rate") is load_metric("win_rate")
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        load_metric("bleu")


# ---------------------------------------------------------------- empty input

EMPTY_CALLS = {
    "compression": dict(responses=[], sources=[]),
    "length_violation": dict(responses=[]),
    "invalid_chars": dict(responses=[]),
    "win_rate": dict(scores=[], baseline_scores=[]),
    "judge_quality": dict(scores=[]),
}


@pytest.mark.parametrize("name", METRICS)
def test_empty_input_raises(name):
    with pytest.raises(ValueError, match=f"{name}: got no"):
        load_metric(name).compute(**EMPTY_CALLS[name])


def test_a_module_still_works_after_a_failed_call():
    """load_metric hands out one cached instance: an error must not poison the next compute()."""
    m = load_metric("judge_quality")
    with pytest.raises(ValueError):
        m.compute(scores=[])
    assert m.compute(scores=[2, 4])["mean_score"] == 3.0


# ---------------------------------------------------------------- compression


def test_compression_two_pairs():
    """Responses of 2 and 4 words against sources of 10 and 8 words.

    ratios 2/10 = 0.2 and 4/8 = 0.5 -> mean = median = (0.2 + 0.5) / 2 = 0.35
    response words 2 and 4         -> mean = median = 3
    """
    out = load_metric("compression").compute(responses=["a b", "a b c d"], sources=[words(10), words(8)])
    assert out == pytest.approx(
        {"median_compression": 0.35, "mean_compression": 0.35, "mean_words": 3.0, "median_words": 3.0}
    )


def test_compression_mean_and_median_differ():
    """Responses of 1, 2 and 6 words, each against a 4-word source.

    ratios 1/4 = 0.25, 2/4 = 0.5, 6/4 = 1.5 -> median 0.5, mean (0.25 + 0.5 + 1.5) / 3 = 2.25 / 3 = 0.75
    words 1, 2, 6                           -> median 2,   mean 9 / 3 = 3
    Words are split on any whitespace: "  a\\tb\\n c  " has 3 words, so its ratio is 3/4 in the 2nd call.
    """
    m = load_metric("compression")
    out = m.compute(responses=["a", "a b", "a b c d e f"], sources=[words(4)] * 3)
    assert out == pytest.approx(
        {"median_compression": 0.5, "mean_compression": 0.75, "mean_words": 3.0, "median_words": 2.0}
    )
    assert m.compute(responses=["  a\tb\n c  "], sources=["x y\tz\nw"])["mean_compression"] == 0.75


def test_compression_rejects_a_source_without_words():
    with pytest.raises(ValueError, match=r"position\(s\) \[1\] have no words"):
        load_metric("compression").compute(responses=["a", "b"], sources=["x", "   "])


# ---------------------------------------------------------------- length_violation


def test_length_violation_defaults_are_200_and_5_inclusive():
    """Word counts 4, 5, 200, 201 with max_words=200, min_words=5 (bounds are allowed).

    too long:  only 201 > 200 -> 1/4 = 0.25
    too short: only 4 < 5     -> 1/4 = 0.25
    """
    out = load_metric("length_violation").compute(responses=[words(4), words(5), words(200), words(201)])
    assert out == {"share_too_long": 0.25, "share_too_short": 0.25}


def test_length_violation_kwargs_at_call_and_at_load():
    """Word counts 1, 3, 4, 10.

    max_words=3, min_words=2 -> too long: 4 and 10 -> 2/4 = 0.5;  too short: 1 -> 1/4 = 0.25
    loaded with max_words=9, called with defaults -> too long: 10 -> 0.25; too short (min 5): 1, 3, 4 -> 0.75
    """
    import evaluate

    responses = [words(1), words(3), words(4), words(10)]
    out = load_metric("length_violation").compute(responses=responses, max_words=3, min_words=2)
    assert out == {"share_too_long": 0.5, "share_too_short": 0.25}

    configured = evaluate.load(str(METRICS_DIR / "length_violation"), max_words=9, keep_in_memory=True)
    assert configured.compute(responses=responses) == {"share_too_long": 0.25, "share_too_short": 0.75}


def test_length_violation_rejects_min_above_max():
    with pytest.raises(ValueError, match="min_words"):
        load_metric("length_violation").compute(responses=["a"], max_words=3, min_words=4)


# ---------------------------------------------------------------- invalid_chars


def test_invalid_chars_default_pattern():
    """5 responses, 3 hit the default pattern -> 3/5 = 0.6.

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
    assert load_metric("invalid_chars").compute(responses=responses) == {"share_invalid": 0.6}


def test_invalid_chars_custom_pattern_and_bad_regex():
    """pattern r"\\d" over "abc", "a1", "22" -> 2 of 3 contain a digit -> 2/3."""
    m = load_metric("invalid_chars")
    assert m.compute(responses=["abc", "a1", "22"], pattern=r"\d")["share_invalid"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        m.compute(responses=["abc"], pattern="[")


# ---------------------------------------------------------------- win_rate


def test_win_rate_three_wins_one_tie_one_loss():
    """diffs 5-1=4, 4-1=3, 3-1=2, 2-2=0, 1-3=-2 -> 3 wins, 1 tie, 1 loss.

    win_rate = (3 + 0.5 * 1) / 5 = 3.5 / 5 = 0.7
    """
    out = load_metric("win_rate").compute(scores=[5, 4, 3, 2, 1], baseline_scores=[1, 1, 1, 2, 3])
    assert (out["wins"], out["ties"], out["losses"], out["n"]) == (3, 1, 1, 5)
    assert out["win_rate"] == pytest.approx(0.7)
    assert out["ci_low"] <= 0.7 <= out["ci_high"]
    assert set(out) == {"win_rate", "wins", "ties", "losses", "ci_low", "ci_high", "n"}


def test_win_rate_tie_tolerance():
    """diffs 0.0, 0.2, 0.6.

    tol 0    -> wins 0.2, 0.6; tie 0.0         -> (2 + 0.5) / 3 = 0.8333...
    tol 0.25 -> win 0.6; ties 0.0, 0.2 (<= tol) -> (1 + 0.5 * 2) / 3 = 0.6666...
    """
    m = load_metric("win_rate")
    kw = dict(scores=[3.0, 3.2, 3.6], baseline_scores=[3.0, 3.0, 3.0], bootstrap_samples=0)
    exact = m.compute(**kw)
    assert (exact["wins"], exact["ties"], exact["losses"]) == (2, 1, 0)
    assert exact["win_rate"] == pytest.approx(2.5 / 3)
    tolerant = m.compute(**kw, tie_tolerance=0.25)
    assert (tolerant["wins"], tolerant["ties"], tolerant["losses"]) == (1, 2, 0)
    assert tolerant["win_rate"] == pytest.approx(2 / 3)
    assert tolerant["ci_low"] is None and tolerant["ci_high"] is None  # bootstrap_samples=0


def test_win_rate_identical_scores_is_one_half():
    """All 4 prompts tie -> (0 + 0.5 * 4) / 4 = 0.5; every resample is all ties, so the CI is [0.5, 0.5]."""
    out = load_metric("win_rate").compute(scores=[1, 2, 3, 4], baseline_scores=[1, 2, 3, 4])
    assert out["win_rate"] == 0.5 and out["ties"] == 4
    assert out["ci_low"] <= 0.5 <= out["ci_high"]
    assert (out["ci_low"], out["ci_high"]) == (0.5, 0.5)


def test_win_rate_swapping_sides_mirrors_it():
    """Swapping model and baseline turns wins into losses: win_rate' = 1 - win_rate (3 wins, 1 tie, 1 loss -> 0.3)."""
    out = load_metric("win_rate").compute(scores=[1, 1, 1, 2, 3], baseline_scores=[5, 4, 3, 2, 1])
    assert out["win_rate"] == pytest.approx(0.3)


def test_win_rate_bootstrap_is_deterministic_under_the_seed_and_follows_the_spec():
    """The CI is the 2.5/97.5 percentile of win rates over pairs resampled with default_rng(seed)."""
    m = load_metric("win_rate")
    scores = [5, 4, 3, 2, 1] * 4
    base = [1, 1, 1, 2, 3] * 4
    a = m.compute(scores=scores, baseline_scores=base, bootstrap_samples=500, seed=7)
    b = m.compute(scores=scores, baseline_scores=base, bootstrap_samples=500, seed=7)
    assert (a["ci_low"], a["ci_high"]) == (b["ci_low"], b["ci_high"])
    assert a["win_rate"] == pytest.approx(0.7)
    assert a["ci_low"] <= a["win_rate"] <= a["ci_high"]

    # Independent re-statement of the procedure: outcome 1 / 0.5 / 0 per prompt, resample prompt indices.
    outcome = np.array([1.0, 1.0, 1.0, 0.5, 0.0] * 4)
    idx = np.random.default_rng(7).integers(0, 20, size=(500, 20))
    low, high = np.percentile(outcome[idx].mean(axis=1), [2.5, 97.5])
    assert (a["ci_low"], a["ci_high"]) == pytest.approx((low, high))


def test_win_rate_ci_narrows_with_more_prompts():
    """Same 3-win/1-tie/1-loss mix (win_rate 0.7) on 5 and on 500 prompts: the CI shrinks roughly as 1/sqrt(n)."""
    m = load_metric("win_rate")
    small = m.compute(scores=[5, 4, 3, 2, 1], baseline_scores=[1, 1, 1, 2, 3], bootstrap_samples=400)
    large = m.compute(scores=[5, 4, 3, 2, 1] * 100, baseline_scores=[1, 1, 1, 2, 3] * 100, bootstrap_samples=400)
    assert large["win_rate"] == pytest.approx(0.7)
    assert large["ci_low"] <= 0.7 <= large["ci_high"]
    small_width = small["ci_high"] - small["ci_low"]
    large_width = large["ci_high"] - large["ci_low"]
    assert large_width < small_width / 4


def test_win_rate_all_wins_gives_a_degenerate_ci():
    out = load_metric("win_rate").compute(scores=[2, 3], baseline_scores=[1, 1])
    assert (out["win_rate"], out["ci_low"], out["ci_high"]) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scores=[1.0, float("nan")], baseline_scores=[1.0, 2.0]), r"non-finite score\(s\) at position\(s\) \[1\]"),
        (dict(scores=[1.0], baseline_scores=[2.0], tie_tolerance=-0.1), "tie_tolerance"),
        (dict(scores=[1.0], baseline_scores=[2.0], bootstrap_samples=-1), "bootstrap_samples"),
        (dict(scores=[1.0, 2.0], baseline_scores=[2.0]), "Mismatch in the number"),  # evaluate's own check
    ],
)
def test_win_rate_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_metric("win_rate").compute(**kwargs)


# ---------------------------------------------------------------- judge_quality


def test_judge_quality_default_thresholds():
    """scores 1, 3, 4, 5.

    mean = 13 / 4 = 3.25;  median = (3 + 4) / 2 = 3.5
    >= 3: 3, 4, 5 -> 3/4 = 0.75;  >= 4: 4, 5 -> 2/4 = 0.5
    """
    out = load_metric("judge_quality").compute(scores=[1, 3, 4, 5])
    assert out == {"mean_score": 3.25, "median_score": 3.5, "share_at_least_3": 0.75, "share_at_least_4": 0.5}


def test_judge_quality_threshold_keys_drop_a_trailing_zero():
    """scores 1, 3, 4, 5 with thresholds 2.5 and 5.0: >= 2.5 -> 3/4; >= 5 -> 1/4; keys ..._2.5 and ..._5."""
    out = load_metric("judge_quality").compute(scores=[1, 3, 4, 5], thresholds=[2.5, 5.0])
    assert out == {"mean_score": 3.25, "median_score": 3.5, "share_at_least_2.5": 0.75, "share_at_least_5": 0.25}


def test_judge_quality_rejects_nan():
    with pytest.raises(ValueError, match="non-finite"):
        load_metric("judge_quality").compute(scores=[1.0, float("nan")])
