"""PNG plots written next to a stage's data (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def score_histogram(scores: Iterable[float], path: Path, title: str, threshold: Optional[float] = None,
                    xlabel: str = "judge score") -> Path:
    """Histogram of finite scores, with the pairing threshold drawn as a dashed line."""
    plt = _pyplot()
    values = [float(s) for s in scores if not math.isnan(float(s))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    distinct = sorted(set(values))
    if distinct and len(distinct) <= 12 and all(v == int(v) for v in distinct):  # quiz / rubric: integer scores
        bins = [v - 0.5 for v in range(int(distinct[0]), int(distinct[-1]) + 2)]
    else:
        bins = 30
    ax.hist(values, bins=bins, color="#4c72b0", edgecolor="white")
    if threshold is not None:
        ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"quality_threshold = {threshold:g}")
        ax.legend(loc="upper left")
    ax.set(title=title, xlabel=xlabel, ylabel="responses")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def length_gap_histogram(chosen_words: Iterable[int], rejected_words: Iterable[int], path: Path,
                         title: str) -> Path:
    """Histogram of chosen-minus-rejected length in words: mass left of 0 means the pairs teach "shorter"."""
    plt = _pyplot()
    gaps = [int(c) - int(r) for c, r in zip(chosen_words, rejected_words)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(gaps, bins=30, color="#55a868", edgecolor="white")
    ax.axvline(0, color="black", linewidth=0.8)
    if gaps:
        mean = sum(gaps) / len(gaps)
        ax.axvline(mean, color="#c44e52", linestyle="--", label=f"mean = {mean:+.1f} words")
        ax.legend(loc="upper right")
    ax.set(title=title, xlabel="chosen words - rejected words", ylabel="pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def overlaid_histograms(values: dict[str, Iterable[float]], path: Path, title: str, xlabel: str) -> Path:
    """One translucent histogram per model on shared bins (stage 4: lengths and judge scores of each model)."""
    import numpy as np

    plt = _pyplot()
    series = {k: np.asarray([float(x) for x in v if not math.isnan(float(x))]) for k, v in values.items()}
    everything = np.concatenate([v for v in series.values() if len(v)] or [np.zeros(1)])
    bins = np.histogram_bin_edges(everything, bins=min(30, max(5, len(everything) // 4)))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, v in series.items():
        ax.hist(v, bins=bins, alpha=0.5, label=f"{name} (median {np.median(v):.3g})" if len(v) else name)
    ax.set(title=title, xlabel=xlabel, ylabel="responses")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def win_tie_loss_bars(counts: dict[str, tuple[int, int, int]], path: Path, baseline: str) -> Path:
    """One stacked bar per model: the share of prompts it won, tied and lost against `baseline` (dashed: 50%)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 1.4 + 0.6 * max(1, len(counts))))
    for i, (name, wtl) in enumerate(counts.items()):
        n, left = max(1, sum(wtl)), 0.0
        for k, label, colour in zip(wtl, ("wins", "ties", "losses"), ("#55a868", "#8c8c8c", "#c44e52")):
            ax.barh(i, k / n, left=left, color=colour, label=label if i == 0 else None)
            if k / n > 0.06:
                ax.text(left + k / n / 2, i, str(k), ha="center", va="center", color="white")
            left += k / n
    ax.set_yticks(range(len(counts)), list(counts))
    ax.invert_yaxis()  # first model on top
    ax.axvline(0.5, color="black", linewidth=0.8, linestyle="--")
    ax.set(xlim=(0, 1), xlabel=f"share of prompts against {baseline}", title="wins / ties / losses")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_training_curves(metrics_file: Path, out_png: Path) -> None:
    """Stage 3's per-step loss, reward accuracy, margin and time waited for the reference pool."""
    import json

    plt = _pyplot()
    rows = [json.loads(line) for line in open(metrics_file)] if Path(metrics_file).exists() else []
    evals = [r for r in rows if "eval/loss" in r]  # held-out pairs (common.validation): drawn over the train curve
    rows = [r for r in rows if "eval/loss" not in r]
    if not rows:
        return
    keys = [("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"),
            ("ref_wait_seconds", "waited for reference (s)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    steps = [r["step"] for r in rows]
    for ax, (k, title) in zip(axes, keys):
        ax.plot(steps, [r.get(k, float("nan")) for r in rows], marker=".", label="train")
        if evals and f"eval/{k}" in evals[0]:
            ax.plot([r["step"] for r in evals], [r[f"eval/{k}"] for r in evals], marker="o", label="eval")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
