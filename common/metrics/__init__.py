"""Stage-4 metrics as Hugging Face `evaluate` modules, loaded from this folder (never the hub).

    from common.metrics import load_metric
    load_metric("win_rate").compute(scores=[...], baseline_scores=[...], bootstrap_samples=1000)

Each metric lives in <name>/<name>.py, the layout `evaluate.load` expects for a local folder.
Loading a local path makes no network call, so this works with HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import functools
from pathlib import Path

METRICS = ("compression", "length_violation", "invalid_chars", "win_rate", "judge_quality")


@functools.lru_cache(maxsize=None)
def load_metric(name: str):
    """The loaded `evaluate` module for `name` (one of METRICS), cached per process.

    keep_in_memory=True: inputs stay in RAM instead of Arrow cache files and lock files under
    ~/.cache/huggingface/metrics, so nothing is written per compute() call.
    """
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    import evaluate  # deferred: importing evaluate costs seconds; callers that never load a metric skip it

    return evaluate.load(str(Path(__file__).parent / name), keep_in_memory=True)
