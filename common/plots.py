"""PNG plots written next to a stage's data (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def score_histogram(scores: Iterable[float], path: Path, title: str, threshold: Optional[float] = None,
                    xlabel: str = "judge score") -> Path:
    """Histogram of finite scores, with the pairing threshold drawn as a dashed line."""
    plt = _pyplot()
    values = np.asarray(list(scores) if not isinstance(scores, np.ndarray) else scores, dtype=np.float64)
    values = values[~np.isnan(values)]  # numpy, not a list: stage 2 passes one score per candidate
    fig, ax = plt.subplots(figsize=(6, 3.5))
    distinct = np.unique(values)
    if distinct.size and distinct.size <= 12 and (distinct == distinct.astype(int)).all():  # quiz / rubric: integers
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
    gaps = np.asarray(chosen_words, dtype=np.int64) - np.asarray(rejected_words, dtype=np.int64)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(gaps, bins=30, color="#55a868", edgecolor="white")
    ax.axvline(0, color="black", linewidth=0.8)
    if gaps.size:
        mean = float(gaps.mean())
        ax.axvline(mean, color="#c44e52", linestyle="--", label=f"mean = {mean:+.1f} words")
        ax.legend(loc="upper right")
    ax.set(title=title, xlabel="chosen words - rejected words", ylabel="pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def overlaid_histograms(values: dict[str, Iterable[float]], path: Path, title: str, xlabel: str) -> Path:
    """One translucent histogram per model on shared bins (stage 4: lengths and judge scores of each model)."""
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


def smoothed(values: list[float], weight: float = 0.6) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0.
    NaNs (a metric missing from a row) are skipped and keep the previous value."""
    out, ema, norm = [], 0.0, 0.0
    for v in values:
        if not math.isnan(v):
            ema, norm = weight * ema + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(ema / norm if norm else float("nan"))
    return out


def plot_training_curves(metrics_file: Path, out_png: Path) -> None:
    """Stage 3's per-step loss, reward accuracy, margin and time waited for the reference pool: raw points and a
    smoothed line for training; the eval rows (`eval/...` keys) as larger markers on the same axes."""
    import json

    plt = _pyplot()
    rows = [json.loads(line) for line in open(metrics_file)] if Path(metrics_file).exists() else []
    if not rows:
        return
    keys = [("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"),
            ("ref_wait_seconds", "waited for reference (s)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, (k, title) in zip(axes, keys):
        train = [(r["step"], float(r[k])) for r in rows if k in r]
        evals = [(r["step"], float(r[f"eval/{k}"])) for r in rows if f"eval/{k}" in r]
        if train:
            steps, values = zip(*train)
            ax.plot(steps, values, ".", color="#4c72b0", alpha=0.35, label="train")
            ax.plot(steps, smoothed(list(values)), "-", color="#4c72b0", label="train (smoothed)")
        if evals:
            steps, values = zip(*evals)
            ax.plot(steps, values, "o--", color="#c44e52", markersize=6, linewidth=0.8, label="eval")
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
