"""Stage 4's report: per-model metrics, the head-to-head win rate against the baseline, report.md and its plots.

Input is one table of judged responses, one row per (prompt, model): PROMPT_ID, SYSTEM, SOURCE, RESPONSE, SCORE,
NUM_WORDS (+ NUM_RESPONSE_TOKENS, FINISH_REASON for generated models). Every number comes from the functions in
common/metrics.py, and the per-prompt verdict comes from stage 2's pairing rule (common.pairing), so the win rate
measures exactly what the preference pairs taught:

    for each prompt, model response a vs baseline response b (same prompt):
        identical text                      -> tie
        unjudged (NaN score) on either side -> left out of the win rate (counted)
        otherwise the pairing rule          -> a preferred: win, b preferred: loss, neither: tie
    win_rate = (wins + 0.5 x ties) / n, with a percentile-bootstrap 95% interval over prompts

Beside that training signal, every report carries signals the model was not trained on (common/metrics.py):
ROUGE-L and embedding similarity against the human references (when the data has them), the share of the
response copied from the source, a length-controlled win rate, and how often the training judge prefers the human
reference over each model's answer (the reference is judged as one more "model", REFERENCE_SYSTEM).

Nothing here starts Ray: it is pandas, numpy and matplotlib on a table that fits in memory (one row per response).
"""
from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from common import schema as S
from common.config import EvaluateStageConfig, FilterConfig, JudgeConfig, PairingConfig
from common import metrics as M


# The human reference answers, judged like a model's: their rows in the judged table carry this SYSTEM name.
REFERENCE_SYSTEM = "human_reference"

# judge type -> what its SCORE is, in words (for report.md)
SCORE_MEANING = {
    "similarity": "faithfulness: cosine similarity of the response's and the source's MiniLM embeddings "
                  "(about 0.8 for a good summary of the abstract, about 0.3 for another paper's summary) "
                  "minus {copy_penalty:g} x the share of the response's 4-grams found in the source (a copy of the "
                  "source: 1); length is not part of it",
    "quiz": "correct answers (0-{num_questions}) when the judge answers its own multiple-choice questions "
            "about the source from the response alone",
    "rubric": "the judge's 1-{scale_max} rating of faithfulness and concision",
}


# ---------------------------------------------------------------- the per-prompt verdict
SAME_TEXT = "same_text"  # a match's branch when both answers are one text: a tie, decided by no branch of the rule


def matches(df: pd.DataFrame, model: str, baseline: str, pairing: PairingConfig) -> pd.DataFrame:
    """Per prompt id: `outcome` (1.0 win, 0.5 tie, 0.0 loss of `model` against `baseline`; NaN where either is
    unjudged) and `branch`, the part of the pairing rule that decided it: common.pairing's QUALITY (an answer below
    the threshold: on score) or LENGTH (both at or above it: on length), or SAME_TEXT."""
    from common.filters import normalize
    from common.pairing import QUALITY, decide

    a = df[df[S.SYSTEM] == model].set_index(S.PROMPT_ID)
    b = df[df[S.SYSTEM] == baseline].set_index(S.PROMPT_ID)
    out = {}
    for pid in a.index.intersection(b.index):
        ra, rb = a.loc[pid], b.loc[pid]
        if normalize(ra[S.RESPONSE]) == normalize(rb[S.RESPONSE]):
            out[pid] = (0.5, SAME_TEXT)  # up to whitespace: a tie, whatever float noise the judge's batching adds
        elif math.isnan(ra[S.SCORE]) or math.isnan(rb[S.SCORE]):
            out[pid] = (float("nan"), QUALITY)
        else:
            p, branch = decide(float(ra[S.SCORE]), int(ra[S.NUM_WORDS]), float(rb[S.SCORE]), int(rb[S.NUM_WORDS]),
                               pairing)
            out[pid] = (1.0 if p > 0 else 0.0 if p < 0 else 0.5, branch)
    return pd.DataFrame.from_dict(out, orient="index", columns=["outcome", "branch"]).astype({"outcome": np.float64})


def outcomes(df: pd.DataFrame, model: str, baseline: str, pairing: PairingConfig) -> pd.Series:
    """Per prompt id: 1.0 win, 0.5 tie, 0.0 loss of `model` against `baseline`; NaN where either is unjudged."""
    return matches(df, model, baseline, pairing)["outcome"]


def by_branch(judged: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{branch: {wins, ties, losses}} of judged matches (`matches` without its NaN rows): where a model wins and
    loses. A model that wins on score and loses on length has become more faithful and longer."""
    counts = ("wins", "ties", "losses")  # counted by metrics.win_rate, the headline's own count (no interval)
    return {branch: {k: v for k, v in M.win_rate(g["outcome"].tolist(), 0, 0).items() if k in counts}
            for branch, g in judged.groupby("branch", sort=True)}


# ---------------------------------------------------------------- metrics
def quality_thresholds(judge: JudgeConfig, pairing: PairingConfig) -> list[float]:
    """quiz: share with >= 3 and >= 4 correct (the Anyscale table); others: share at/above the pairing threshold."""
    if judge.type == "quiz":
        return [3, 4]
    return [pairing.quality_threshold]


def reference_metrics(rows: pd.DataFrame, embed) -> dict[str, Any]:
    """ROUGE-L and embedding similarity against the human reference, over the rows that have one (None if none)."""
    has = rows[S.REFERENCE].fillna("").astype(str).str.strip() != "" if S.REFERENCE in rows else []
    if not len(has) or not has.any():
        return {"rouge_l": None, "reference_similarity": None, "n_with_reference": 0}
    responses = rows.loc[has, S.RESPONSE].astype(str).tolist()
    references = rows.loc[has, S.REFERENCE].astype(str).tolist()
    sim = M.embedding_similarity(embed(responses), embed(references)) if embed else None
    return {"rouge_l": M.rouge_l(responses, references), "reference_similarity": sim,
            "n_with_reference": int(has.sum())}


def model_metrics(rows: pd.DataFrame, judge: JudgeConfig, filters: FilterConfig,
                  pairing: PairingConfig, embed=None) -> dict[str, Any]:
    """The metric column of one model (its rows only); `embed` maps texts to embeddings (None: no similarity)."""
    responses = rows[S.RESPONSE].astype(str).tolist()
    out: dict[str, Any] = {"n": len(rows)}
    scores = rows[S.SCORE].to_numpy(dtype=np.float64)
    judged = scores[np.isfinite(scores)]
    out["share_unjudged"] = float(1 - len(judged) / len(scores))
    if len(judged):
        out.update(M.judge_quality(judged.tolist(), quality_thresholds(judge, pairing)))
    out.update(M.compression(responses, rows[S.SOURCE].astype(str).tolist()))
    out.update(M.length_violation(responses, filters.max_words, filters.min_words))
    # "" turns the check off in stage 2 too
    out["share_invalid"] = M.share_invalid(responses, filters.invalid_chars) if filters.invalid_chars else None
    generated = rows[S.FINISH_REASON].astype(str) != ""
    out["share_hit_max_tokens"] = float((rows.loc[generated, S.FINISH_REASON] == "length").mean()) \
        if generated.any() else None
    out.update(M.copy_share(responses, rows[S.SOURCE].astype(str).tolist()))
    out.update(reference_metrics(rows, embed))
    return out


def length_diffs(df: pd.DataFrame, model: str, baseline: str, ids) -> list[float]:
    """words(model) - words(baseline), per prompt id in `ids`."""
    w = df.set_index([S.SYSTEM, S.PROMPT_ID])[S.NUM_WORDS]
    return [float(w[(model, i)] - w[(baseline, i)]) for i in ids]


def judge_prefers_reference(df: pd.DataFrame, model: str, pairing: PairingConfig, bootstrap_samples: int,
                            seed: int) -> dict[str, Any]:
    """The training judge's verdict, human reference vs `model`'s answer, by the pairing rule: the reference's
    win rate, and the share of prompts it is preferred outright (`preferred`). {} without references."""
    if not (df[S.SYSTEM] == REFERENCE_SYSTEM).any():
        return {}
    o = outcomes(df, REFERENCE_SYSTEM, model, pairing).dropna()
    if not len(o):
        return {}
    wr = M.win_rate(o.tolist(), bootstrap_samples, seed)
    return wr | {"preferred": wr["wins"] / wr["n"]}


def compute(df: pd.DataFrame, names: list[str], baseline: str, judge: JudgeConfig, filters: FilterConfig,
            pairing: PairingConfig, bootstrap_samples: int, seed: int, embed=None) -> dict[str, Any]:
    """metrics.json: per-model metrics, and for every model but the baseline its win rate against the baseline."""
    models = {n: model_metrics(df[df[S.SYSTEM] == n], judge, filters, pairing, embed) for n in names}
    for n in names:
        models[n]["judge_vs_reference"] = judge_prefers_reference(df, n, pairing, bootstrap_samples, seed)
    head_to_head = {}
    for n in names:
        if n == baseline:
            continue
        m = matches(df, n, baseline, pairing)
        judged = m.dropna(subset=["outcome"])
        valid = judged["outcome"]
        wr = M.win_rate(valid.tolist(), bootstrap_samples, seed) if len(valid) else {}
        wr["unjudged"] = len(m) - len(judged)
        wr["by_branch"] = by_branch(judged)
        wr["mean_score_delta"] = _delta(models[n], models[baseline], "mean_score")
        wr["mean_words_delta"] = _delta(models[n], models[baseline], "mean_words")
        wr["length_controlled"] = M.length_controlled_win_rate(
            valid.tolist(), length_diffs(df, n, baseline, valid.index), bootstrap_samples, seed) if len(valid) else {}
        head_to_head[n] = wr
    return {"baseline": baseline, "models": models, "win_rate": head_to_head}


def _delta(a: dict, b: dict, key: str) -> Optional[float]:
    return a[key] - b[key] if a.get(key) is not None and b.get(key) is not None else None


def _win_rate_check(wr: dict, base: str, target: float) -> tuple[str, bool]:
    """At least `target`, and, where the bootstrap ran, the 95% interval's lower end above a coin flip: a rate
    over the bar on a handful of prompts is not yet a win."""
    if wr.get("ci_low") is None:
        return f"win rate vs {base} >= {target:.0%} (got {wr['win_rate']:.1%})", wr["win_rate"] >= target
    return (f"win rate vs {base} >= {target:.0%} with its 95% CI above 50% "
            f"(got {wr['win_rate']:.1%} [{wr['ci_low']:.1%}, {wr['ci_high']:.1%}])",
            wr["win_rate"] >= target and wr["ci_low"] > 0.5)


def target_check(metrics: dict, model: str, target_win_rate: float, max_score_drop: float) -> list[tuple[str, bool]]:
    """The project's bar: beats the baseline on the win rate, is shorter, keeps its quality; and on the signals it
    was not trained on, no loss: ROUGE-L against the human references not lower, copy share not higher."""
    wr = metrics["win_rate"].get(model, {})
    base = metrics["baseline"]
    checks = []
    if wr.get("win_rate") is not None:
        checks.append(_win_rate_check(wr, base, target_win_rate))
    if wr.get("mean_words_delta") is not None:
        checks.append((f"shorter than {base} on average (mean words {wr['mean_words_delta']:+.1f})",
                       wr["mean_words_delta"] < 0))
    if wr.get("mean_score_delta") is not None:
        checks.append((f"mean judge score drops by at most {max_score_drop:g} (got {wr['mean_score_delta']:+.4f})",
                       wr["mean_score_delta"] >= -max_score_drop))
    a, b = metrics["models"].get(model, {}), metrics["models"].get(base, {})
    if a.get("rouge_l") is not None and b.get("rouge_l") is not None:
        checks.append((f"ROUGE-L vs human not lower than {base} (got {a['rouge_l']:.4f} vs {b['rouge_l']:.4f})",
                       a["rouge_l"] >= b["rouge_l"]))
    if a.get("copy_share") is not None and b.get("copy_share") is not None:
        checks.append((f"copy share not higher than {base} (got {a['copy_share']:.1%} vs {b['copy_share']:.1%})",
                       a["copy_share"] <= b["copy_share"]))
    return checks


# ---------------------------------------------------------------- the table
def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _num(x, digits=3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _similarity_name(judge: JudgeConfig) -> str:
    p = judge.similarity.copy_penalty
    return f" (faithfulness - {p:g} x copy share)" if p else " (faithfulness)"


def table_rows(metrics: dict, judge: JudgeConfig, filters: FilterConfig, pairing: PairingConfig,
               names: list[str]) -> list[list[str]]:
    """Metric x model, like the Anyscale example's table, with the win-rate rows on top."""
    base, models, wr = metrics["baseline"], metrics["models"], metrics["win_rate"]

    def row(label, fn):
        return [label] + [fn(n) for n in names]

    def win(n):
        w = wr.get(n)
        if not w or w.get("win_rate") is None:
            return "—"
        return f"{_pct(w['win_rate'])} [{_pct(w['ci_low'])}, {_pct(w['ci_high'])}]"

    rows = [
        row(f"win rate vs {base} [95% CI]", win),
        row("wins / ties / losses", lambda n: f"{wr[n]['wins']} / {wr[n]['ties']} / {wr[n]['losses']}"
            if n in wr and "wins" in wr[n] else "—"),
        row("... decided on score · on length", lambda n: _branches(wr.get(n))),
        row("mean judge score" + (_similarity_name(judge) if judge.type == "similarity" else ""),
            lambda n: _num(models[n].get("mean_score"))),
    ]
    for t in quality_thresholds(judge, pairing):
        label = f"accuracy (>= {t:g} correct)" if judge.type == "quiz" else \
            f"share faithful (score >= {t:g}, the pairing threshold)"
        rows.append(row(label, lambda n, k=M.threshold_key(t): _pct(models[n].get(k))))
    rows += [
        row("median compression (words / source words)", lambda n: _pct(models[n]["median_compression"])),
        row("mean compression", lambda n: _pct(models[n]["mean_compression"])),
        row("mean words", lambda n: f"{models[n]['mean_words']:.1f}"),
        row(f"share too long (> {filters.max_words} words)", lambda n: _pct(models[n]["share_too_long"])),
        row(f"share too short (< {filters.min_words} words)", lambda n: _pct(models[n]["share_too_short"])),
        row("share with invalid characters", lambda n: _pct(models[n]["share_invalid"])),
        row("share that hit max_tokens", lambda n: _pct(models[n]["share_hit_max_tokens"])),
    ]
    rows += signal_rows(metrics, names, row)
    if any(models[n]["share_unjudged"] for n in names):
        rows.append(row("share the judge could not score", lambda n: _pct(models[n]["share_unjudged"])))
    return rows


def _branches(w: Optional[dict]) -> str:
    """"34 / 21 / 8 · 9 / 8 / 20": wins / ties / losses of the matches decided on score, then on length."""
    from common.pairing import LENGTH, QUALITY

    got = (w or {}).get("by_branch")
    if not got:
        return "—"
    text = " · ".join("{wins} / {ties} / {losses}".format(**got.get(k, dict(wins=0, ties=0, losses=0)))
                      for k in (QUALITY, LENGTH))
    same = got.get(SAME_TEXT, {}).get("ties")
    return f"{text} (+{same} same text)" if same else text


def signal_rows(metrics: dict, names: list[str], row) -> list[list[str]]:
    """The rows of the signals the model was not trained on (reference rows only when the data has references)."""
    base, models, wr = metrics["baseline"], metrics["models"], metrics["win_rate"]

    def lc(n):
        w = (wr.get(n) or {}).get("length_controlled") or {}
        if w.get("lc_win_rate") is None:
            return "—"
        return f"{_pct(w['lc_win_rate'])} [{_pct(w['ci_low'])}, {_pct(w['ci_high'])}]"

    rows = [row(f"win rate vs {base}, length-controlled [95% CI]", lc),
            row(f"copy share ({M.COPY_NGRAM}-grams found in the source)", lambda n: _pct(models[n]["copy_share"])),
            row(f"share near-verbatim copies (> {M.NEAR_VERBATIM:.0%} of {M.COPY_NGRAM}-grams)",
                lambda n: _pct(models[n]["share_near_verbatim"]))]
    if any(models[n].get("rouge_l") is not None for n in names):
        rows += [row("ROUGE-L F1 vs human reference", lambda n: _num(models[n]["rouge_l"], 4)),
                 row("embedding similarity to human reference", lambda n: _num(models[n]["reference_similarity"])),
                 row("judge prefers human reference over this model",
                     lambda n: _pct(models[n]["judge_vs_reference"].get("preferred")))]
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def header(names: list[str], baseline: str) -> list[str]:
    return ["metric"] + [f"{n} (baseline)" if n == baseline else n for n in names]


# ---------------------------------------------------------------- examples
def pick_examples(df: pd.DataFrame, model: str, baseline: str, pairing: PairingConfig, k: int) -> list[tuple]:
    """Up to k (prompt id, verdict) for `model` vs baseline: a win, a loss and a tie first, in data order."""
    o = outcomes(df, model, baseline, pairing).dropna()
    order = list(dict.fromkeys(df[S.PROMPT_ID]))
    o = o.reindex([p for p in order if p in o.index])
    label = {1.0: "win", 0.0: "loss", 0.5: "tie"}
    picked = []
    for v in (1.0, 0.0, 0.5):
        hit = o[o == v]
        if len(hit) and len(picked) < k:
            picked.append((hit.index[0], label[v]))
    for pid, v in o.items():
        if len(picked) >= k:
            break
        if pid not in [p for p, _ in picked]:
            picked.append((pid, label[v]))
    return picked


def _quote(text: str, width: int = 110) -> str:
    text = " ".join(str(text).split()) or "(empty)"
    return "\n".join("> " + line for line in textwrap.wrap(text, width))


def examples_md(df: pd.DataFrame, names: list[str], model: str, baseline: str, pairing: PairingConfig,
                k: int, source_words: int = 80) -> str:
    parts = []
    for i, (pid, verdict) in enumerate(pick_examples(df, model, baseline, pairing, k), 1):
        rows = df[df[S.PROMPT_ID] == pid].set_index(S.SYSTEM)
        src = str(rows[S.SOURCE].iloc[0]).split()
        cut = " ".join(src[:source_words]) + (" …" if len(src) > source_words else "")
        parts.append(f"### Example {i}: prompt `{pid}` ({model} vs {baseline}: {verdict})\n\n"
                     f"Source ({len(src)} words):\n\n{_quote(cut)}\n")
        for n in [*names, REFERENCE_SYSTEM]:  # the human reference last, when the data has one
            if n in rows.index:
                r = rows.loc[n]
                parts.append(f"**{n}** ({int(r[S.NUM_WORDS])} words, score {_num(r[S.SCORE])}):\n\n"
                             f"{_quote(r[S.RESPONSE])}\n")
    return "\n".join(parts)


# ---------------------------------------------------------------- plots
def draw_plots(df: pd.DataFrame, names: list[str], metrics: dict, judge: JudgeConfig, folder: Path,
               dpo_manifest: dict) -> tuple[dict[str, str], list[str]]:
    """The PNGs of report.md ({title: file}) and notes on what could not be drawn."""
    from common.plots import overlaid_histograms, win_tie_loss_bars

    by_model = {n: df[df[S.SYSTEM] == n] for n in names}
    overlaid_histograms({n: r[S.NUM_WORDS] for n, r in by_model.items()}, folder / "lengths.png",
                        "response lengths", "words per response")
    overlaid_histograms({n: r[S.SCORE] for n, r in by_model.items()}, folder / "scores.png",
                        "judge scores", f"judge score ({judge.type})")
    wr = {n: (w["wins"], w["ties"], w["losses"]) for n, w in metrics["win_rate"].items() if w.get("n")}
    win_tie_loss_bars(wr, folder / "win_tie_loss.png", metrics["baseline"])
    files = {"response lengths": "lengths.png", "judge scores": "scores.png",
             f"wins, ties and losses against {metrics['baseline']}": "win_tie_loss.png"}
    curves = dpo_manifest.get("curves")  # drawn by stage 3 from its per-step metrics: copied, not redrawn
    if curves and Path(curves).is_file():
        shutil.copyfile(curves, folder / "training_curves.png")
        files["DPO training curves (stage 3)"] = "training_curves.png"
        return files, []
    return files, [f"stage 3 left no training curves ({curves or 'none named in its manifest'})"]


# ---------------------------------------------------------------- which signal trained the model
def signals(judge: JudgeConfig, rule: str, has_references: bool) -> dict[str, Any]:
    """In words, for report.md and metrics.json: the signal DPO was trained on, and the ones it never saw."""
    independent = [f"copy share: {M.COPY_NGRAM}-grams of the response found in the source, and the share of "
                   f"near-verbatim copies (not part of the judge or the pairing rule)",
                   "length-controlled win rate: the training judge's verdicts with the length difference factored "
                   "out (so it still carries the judge's own view, minus the pairing rule's preference for shorter)"]
    if has_references:
        independent = ["ROUGE-L F1 against the human reference summaries (rouge_score)",
                       "embedding similarity (MiniLM) to the human reference summaries"] + independent + [
            "judge sanity: how often the training judge prefers the human reference over each model's answer "
            "(the training judge, checked against humans)"]
    return {"trained_on": f"the `{judge.type}` judge's score with stage 2's pairing rule ({rule}); the win rate, "
                          f"judge score and share-faithful rows measure how well DPO learned this signal",
            "not_trained_on": independent}


def embedder_path(judge: JudgeConfig) -> Path:
    """The similarity judge's sentence-transformers folder (checked before any model starts)."""
    from common.config import resolve
    from common.errors import UserError

    path = resolve(judge.similarity.embedder)
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise UserError(f"judge.similarity.embedder: {judge.similarity.embedder} is not a sentence-transformers "
                        f"folder (stage 4 embeds answers and references with it); run `bash scripts/setup.sh` to "
                        f"prepare the embedded models")
    return path


def embedder(judge: JudgeConfig):
    """texts -> normalised embeddings, with the similarity judge's model and loading code (whatever the judge)."""
    from common.judges.similarity import _Embedder

    path = embedder_path(judge)
    from transformers.utils import logging as hf_logging

    from common.ray_setup import interactive

    if not interactive():  # the weight-loading bar is carriage-return debris in a log file
        hf_logging.disable_progress_bar()
    model = _Embedder(str(path), judge.similarity.batch_size, judge.similarity.copy_penalty).model
    return lambda texts: model.encode(list(texts), normalize_embeddings=True,
                                      batch_size=judge.similarity.batch_size, show_progress_bar=False)


# ---------------------------------------------------------------- report.md
SIGNAL_HELP = [
    f"- **Copy share**: per response, the share of its {M.COPY_NGRAM}-word runs that occur in the source "
    f"(lower-cased words), averaged; a **near-verbatim copy** has more than {M.NEAR_VERBATIM:.0%} of them in "
    "the source. A judge that rewards copying shows as a model that wins while its copy share rises.",
    "- **Length-controlled win rate**: a logistic fit of each prompt's verdict on the length difference "
    "(AlpacaEval 2's idea, simplified: common.metrics.length_controlled_win_rate), read at equal length. "
    "Far below the plain win rate: the wins came from being shorter.",
    "- **ROUGE-L** (F1, Google's rouge_score, stemmed) and **embedding similarity** compare each answer with "
    "the human reference summary; **judge prefers human reference** is the share of prompts where the "
    "training judge, by the pairing rule, picks the human summary over the model's answer (ties are not "
    "preferences): a judge that seldom prefers the humans over the SFT model is not measuring summaries.",
]


def signals_md(sig: dict) -> list[str]:
    return ["## What trained the model, and what did not", "",
            f"- **Trained on**: {sig['trained_on']}.",
            "- **Not trained on** (the model never saw these; a DPO model that only learned the judge shows it here):",
            *[f"  - {x}" for x in sig["not_trained_on"]], ""]


def pairing_rule_text(pairing: PairingConfig) -> str:
    return (f"if either response scores below {pairing.quality_threshold:g}, the higher score wins"
            f"{f' (by at least {pairing.quality_margin:g})' if pairing.quality_margin else ''}; otherwise the "
            f"shorter wins when it is at least {pairing.min_length_gap} words shorter; anything else is a tie")


def write_report(path: Path, *, metrics: dict, names: list[str], dpo: str, df: pd.DataFrame, judge: JudgeConfig,
                 filters: FilterConfig, pairing: PairingConfig, data_desc: str, decoding: str, num_examples: int,
                 target_win_rate: float, max_score_drop: float, plots: dict[str, str], notes: list[str],
                 from_stage2: bool = True) -> str:
    """Writes report.md; returns the metric table (markdown) so the stage can print it."""
    base = metrics["baseline"]
    table = markdown_table(header(names, base), table_rows(metrics, judge, filters, pairing, names))
    meaning = SCORE_MEANING[judge.type].format(num_questions=judge.quiz.num_questions,
                                               scale_max=judge.rubric.scale_max,
                                               copy_penalty=judge.similarity.copy_penalty)
    rule = pairing_rule_text(pairing)
    rule_name = "stage 2's pairing rule (the rule that built the training pairs)" if from_stage2 else \
        "the pairing rule of this config"
    bounds = "stage 2's filter bounds" if from_stage2 else "the filter bounds"
    checks = target_check(metrics, dpo, target_win_rate, max_score_drop)
    lines = [
        f"# Stage 4: {dpo} against {base}",
        "",
        f"{data_desc}; {decoding}. Judge: `{judge.type}`, with its filters and pairing rule, from "
        f"{'stage 2, unchanged' if from_stage2 else 'this config (no stage-2 run)'}.",
        "",
        table,
        "",
        "## Does the DPO model meet the bar?",
        "",
        *[f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks],
        "",
        *signals_md(metrics["signals"]),
        "## How to read this",
        "",
        f"- **Judge score**: {meaning}. Higher is better.",
        f"- **Win rate** against {base}: each prompt is one match between the two responses to it, decided by "
        f"{rule_name}: {rule}. Identical responses tie. "
        f"Win rate = (wins + 0.5 x ties) / prompts; 50% means no difference. The 95% interval is a bootstrap "
        f"over prompts: with few prompts it is wide, and a win rate whose interval contains 50% is not a "
        f"difference.",
        "- **Compression** = response words / source words (lower is shorter). **Too long / too short** use "
        f"{bounds} ({filters.min_words}-{filters.max_words} words); **invalid characters** uses "
        "its regex. **Hit max_tokens**: the response was cut off by `sampling.max_tokens`; if that share is "
        "large, lengths and scores describe truncated text.",
        "- A DPO model that wins by being shorter while its judge score holds is what the pairs rewarded; "
        "one that wins while its score falls is trading faithfulness for brevity.",
        "- **Decided on score · on length**: wins / ties / losses split by the part of the rule that decided them: "
        "on score when either answer falls below the threshold (or the shorter one lost more than "
        "`max_score_drop`), on length when both are at or above it. A model that wins on score and loses on length "
        "has become more faithful and longer: the win rate asks for both.",
        *SIGNAL_HELP,
        "",
    ]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{title}]({file})\n" for title, file in plots.items()]
    if num_examples:
        lines += ["## Side by side", "", examples_md(df, names, dpo, base, pairing, num_examples)]
    path.write_text("\n".join(lines))
    return table


def assemble(folder: Path, df: pd.DataFrame, names: list[str], cfg: EvaluateStageConfig, *, judge: JudgeConfig,
             filters: FilterConfig, pairing: PairingConfig, dpo_manifest: dict, notes: list[str],
             models_used: dict[str, str], dpo: str = "dpo", embed=None) -> tuple[dict, str]:
    """Everything stage 4 writes beside data/: metrics.json, the PNGs, report.md. Returns (metrics, table)."""
    base = cfg.baseline.name
    metrics = compute(df, names, base, judge, filters, pairing, cfg.bootstrap_samples, cfg.seed, embed)
    metrics["signals"] = signals(judge, pairing_rule_text(pairing), (df[S.SYSTEM] == REFERENCE_SYSTEM).any())
    files, missing = draw_plots(df, names, metrics, judge, folder, dpo_manifest)
    notes = list(notes) + missing
    s = cfg.sampling
    decoding = ("greedy decoding" if s.temperature == 0 else f"sampling at temperature {s.temperature:g}") + \
        f", max_tokens {s.max_tokens}"
    prompts = df[S.PROMPT_ID].nunique()
    table = write_report(
        folder / "report.md", metrics=metrics, names=names, dpo=dpo, df=df, judge=judge, filters=filters,
        pairing=pairing, data_desc=f"{prompts} held-out prompts from `{cfg.data.path}`", decoding=decoding,
        num_examples=cfg.num_examples, target_win_rate=cfg.target_win_rate, max_score_drop=cfg.max_score_drop,
        plots=files, notes=notes, from_stage2=bool(cfg.judge_dir))
    metrics.update({
        "prompts": prompts, "judge": judge.type, "decoding": decoding, "notes": notes, "models_used": models_used,
        "targets": [{"check": c, "pass": ok} for c, ok in target_check(metrics, dpo, cfg.target_win_rate,
                                                                        cfg.max_score_drop)],
    })
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics, table
