"""Training curves of stage 3 (moved into common/plots.py once that exists)."""
from __future__ import annotations

import json
from pathlib import Path


def plot_training_curves(metrics_file: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_file)] if Path(metrics_file).exists() else []
    if not rows:
        return
    keys = [("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"),
            ("ref_wait_seconds", "waited for reference (s)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    steps = [r["step"] for r in rows]
    for ax, (k, title) in zip(axes, keys):
        ax.plot(steps, [r.get(k, float("nan")) for r in rows], marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
