"""Validation during training, in each Ray Train worker: held-out pairs scored with no update, under TRL's names.

The held-out pairs (`valid_path`, or stage 2's `pairing.valid_fraction` share of prompts) went through the same
tokeniser and reference pool as the training pairs before training started; every worker receives all of them
(Ray Train does not split the `valid` dataset) and scores its slice `rows[rank::world]`. Rank 0 appends one record
per evaluation to metrics.jsonl: `step` plus `eval/loss`, `eval/rewards/accuracies`, `eval/rewards/margins`,
`eval/rewards/chosen`, `eval/rewards/rejected`, averaged over every held-out pair. Evaluations run at step 0 (the
policy is the reference: eval/loss = ln 2), every `eval_steps` optimizer steps and after the last step.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from common import schema as S
from common import tracking
from common.dpo_loss import dpo_metrics
from common.progress import eval_line

EVAL_KEYS = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/rewards/chosen",
             "eval/rewards/rejected")


class Validation:
    """One worker's held-out pairs and when to score them. With no `shard` every call is a no-op."""

    def __init__(self, cfg, shard, rank: int, world: int, metrics_file: Path):
        self.cfg, self.rank, self.world, self.path = cfg, rank, world, metrics_file
        self.rows: list[dict] = []
        self.last_step: int | None = None
        if shard is not None:
            from common.train_loop import _split

            rows = [r for b in shard.iter_batches(batch_size=256, batch_format="numpy") for r in _split(b)]
            self.rows = sorted(rows, key=lambda r: str(r[S.PAIR_ID]))  # the same order on every worker

    def after_step(self, run, epoch: int) -> None:
        """Every `eval_steps` optimizer steps (all ranks call this after each step)."""
        every = self.cfg.eval_steps
        if every and run.progress.global_step % every == 0:
            self.evaluate(run, epoch)

    def evaluate(self, run, epoch: int) -> dict | None:
        """Score the held-out pairs now, once per step (a collective: every rank calls it at the same step)."""
        step = run.progress.global_step
        if not self.rows or self.last_step == step:
            return None
        self.last_step, t0 = step, time.time()
        sums = self._sums(run)
        if run.world > 1:
            import torch.distributed as dist

            sums = sums.to(run.device)
            dist.all_reduce(sums)
        n = sums[-1].item()
        m = {"step": step, "epoch": epoch + 1, **{k: v / n for k, v in zip(EVAL_KEYS, sums[:-1].tolist())},
             "eval/num_pairs": int(n), "eval/seconds": round(time.time() - t0, 2),
             "eval/ref_pids": sorted({int(r[S.REF_PID]) for r in self.rows})}
        if self.rank == 0:
            write_eval_row(self.path, m)
        return m

    def _sums(self, run) -> torch.Tensor:
        """Pair-weighted sums of this rank's EVAL_KEYS, then its pair count. Every rank runs the same number of
        forwards (a shorter slice repeats a pair with weight 0): DDP and FSDP forwards are collectives."""
        from common.train_loop import forward_loss

        bs = self.cfg.eval_batch_size_per_device
        mine = self.rows[self.rank::self.world]
        batches = math.ceil(math.ceil(len(self.rows) / self.world) / bs)
        sums = torch.zeros(len(EVAL_KEYS) + 1, dtype=torch.float64)
        run.model.eval()
        try:
            with torch.no_grad():
                for i in range(batches):
                    batch = mine[i * bs:(i + 1) * bs]
                    out = forward_loss(run, batch or self.rows[:1])
                    m = dpo_metrics(out.loss, out.chosen_rewards, out.rejected_rewards, out.chosen_logps,
                                    out.rejected_logps)
                    n = len(batch)
                    sums += torch.tensor([m[k.removeprefix("eval/")] * n for k in EVAL_KEYS] + [n],
                                         dtype=torch.float64)
        finally:
            run.model.train()
        return sums


def write_eval_row(path: Path, m: dict) -> None:
    """Append one evaluation to metrics.jsonl (beside the training rows) and print it, as rank 0 does for steps."""
    with open(path, "a") as f:
        f.write(json.dumps({**m, "trainer_pid": os.getpid()}) + "\n")
    tracking.log_metrics(m)  # report_to: the eval rows too, under TRL's eval/* names
    print(eval_line(m), flush=True)
