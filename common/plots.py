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
