"""Stage 3's training progress, shown by the driver from the metrics file rank 0 appends to (common.train_loop).

The Ray Train workers' own output is not forwarded to the terminal by default (common.ray_setup), so the driver
follows the metrics file instead: in a terminal, one tqdm bar (steps, ETA, loss, reward accuracy); otherwise one line
per logged step, each line once. With --verbose the workers' own lines are forwarded and this stays silent.
"""
from __future__ import annotations

import json
import math
import threading
from contextlib import contextmanager
from pathlib import Path

from common.ray_setup import interactive, verbose

STAGE = "03_dpo_train"


def step_line(m: dict) -> str:
    """One logged training step (a metrics.jsonl record), as rank 0 and the driver print it."""
    return (f"[{STAGE}] epoch {m['epoch']} step {m['step']}/{m.get('total_steps', '?')} "
            f"loss {m['loss']:.4f} acc {m['rewards/accuracies']:.2f} margin {m['rewards/margins']:+.4f} "
            f"lr {m['lr']:.2e} tok/s {m['tokens_per_second_per_worker']:.0f} ref-wait {m['ref_wait_seconds']:.1f}s")


def eval_line(m: dict) -> str:
    """One evaluation on the held-out pairs (a metrics.jsonl record with `eval/loss`, common.validation)."""
    return (f"[{STAGE}] eval at step {m['step']}: loss {m['eval/loss']:.4f} acc {m['eval/rewards/accuracies']:.2f} "
            f"margin {m['eval/rewards/margins']:+.4f} on {m.get('eval/num_pairs', '?')} held-out pairs")


def notes(m: dict, tolerance: float | None) -> list[str]:
    """What rank 0 recorded in this record besides the metrics: a resume, the step-0 check (policy and reference
    must agree before the first update). `tolerance`: warn above it (None when the reference is another model)."""
    lines = []
    if "resumed_from_step" in m:
        lines.append(f"[{STAGE}] resumed from checkpoint at epoch {m['epoch']}, step {m['resumed_from_step']}")
    diff = m.get("step0_max_abs_logp_diff")
    if diff is None:
        return lines
    loss = f" (loss {m['step0_loss']:.4f}, ln 2 = {math.log(2):.4f})" if "step0_loss" in m else ""
    lines.append(f"[{STAGE}] step-0 check: max |policy - reference| log-prob = {diff:.2e}{loss}")
    if tolerance is not None and diff > tolerance:
        lines.append(f"[{STAGE}] WARNING: policy and reference disagree by {diff:.3g} > {tolerance} at step 0 "
                     f"although they are the same model: check dtype, chat template and padding (NeMo-Aligner #227)")
    return lines


class _Follower:
    """Reads the records appended since it started (a resumed run's earlier records were shown by that run)."""

    def __init__(self, path: Path, tolerance: float | None):
        self.path, self.tolerance = path, tolerance
        self.offset = path.stat().st_size if path.exists() else 0
        self.bar = None

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line being written is read next time
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            if line.strip():
                self.show(json.loads(line))

    def show(self, m: dict) -> None:
        if "eval/loss" in m:  # an evaluation, not a training step: one line, the bar (if any) stays
            if self.bar is not None:
                self.bar.write(eval_line(m))
            else:
                print(eval_line(m), flush=True)
            return
        lines = notes(m, self.tolerance)
        if not interactive():
            for line in [*lines, step_line(m)]:
                print(line, flush=True)
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=m.get("total_steps"), desc=f"[{STAGE}] training", unit="step",
                            initial=m["step"] - 1, dynamic_ncols=True)
        for line in lines:
            self.bar.write(line)
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['rewards/accuracies']:.2f}", refresh=False)
        self.bar.update(m["step"] - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def follow_training(metrics_file: Path, step0_tolerance: float | None):
    """Show training progress while the block (trainer.fit()) runs."""
    if verbose():
        yield
        return
    follower, stop = _Follower(metrics_file, step0_tolerance), threading.Event()

    def loop():
        while not stop.wait(1.0):
            follower.poll()

    thread = threading.Thread(target=loop, name="training-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        follower.poll()
        follower.close()
