"""The DPO training loop that runs in each Ray Train worker. It never loads the reference model: reference log-probs
arrive with every batch from the reference actor pool (common.reference), through `get_dataset_shard`.

`train_loop_per_worker` reads top to bottom: `setup` (model, optimizer, LR schedule, resume from the latest
checkpoint), then per epoch `Feed.batches` (epoch 1 streams from the reference pool; the worker keeps its shard's
rows, so later epochs reuse the reference log-probs instead of recomputing them), `forward_loss` + backward and
`optimizer_step` per step, `MetricsLog.write` (averaged over workers, rank 0 writes) and `report` (checkpoints: the
adapter or full weights, the optimizer and the position). After a worker failure Ray Train restarts the group from
the latest checkpoint, and the resumed epoch skips the pairs it had already trained on.
"""
from __future__ import annotations

import json
import math
import os
import queue
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from common import schema as S
from common import tracking
from common.config import DPOStageConfig
from common.dpo_loss import dpo_loss, dpo_metrics, model_logps, supports_logits_to_keep
from common.errors import UserError
from common.progress import step_line
from common.reference import record_provenance
from common.sharding import shard_model
from common.tokenize import collate_pairs
from common.validation import Validation

BATCH_COLUMNS = [S.PROMPT_IDS, S.CHOSEN_IDS, S.REJECTED_IDS, S.REF_CHOSEN_LOGPS, S.REF_REJECTED_LOGPS, S.PAIR_ID,
                 S.REF_PID]
# Our schedule names -> transformers'. Ours warm up before every schedule, constant included.
LR_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


class NonFiniteLoss(Exception):
    """Raised on every rank at once; rank 0 hands the message to the driver, which prints it as one line."""


@dataclass
class Progress:
    """Where training is; saved in every checkpoint. `done_ids`: the pairs the current epoch has trained on."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    done_ids: list[str] = field(default_factory=list)


@dataclass
class Run:
    """One worker's training set-up, as `setup` builds it; only `progress` changes while training."""

    cfg: DPOStageConfig
    rank: int
    world: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]
    device: torch.device
    head_window: bool  # the model takes `logits_to_keep` (see common.dpo_loss.model_logps)
    pad_id: int
    steps_per_epoch: int
    total_steps: int
    progress: Progress


@dataclass(frozen=True)
class StepOutput:
    """One micro-batch's forward: the loss to backpropagate, and detached tensors for the metrics."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_logits: torch.Tensor
    rejected_logits: torch.Tensor
    max_abs_logp_diff: torch.Tensor  # |policy - reference| log-prob, largest over the batch
    tokens: int
    pair_ids: list[str]


# ------------------------------------------------------------------------------------------------ the loop
def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point. `config`: the stage config (`cfg`, as JSON), `num_pairs`, `metrics_file`,
    `error_file` (where rank 0 explains a stop the driver must not retry) and `has_valid`
    (a `valid` dataset of held-out pairs is there: common.validation)."""
    import ray.train

    cfg = DPOStageConfig.model_validate(config["cfg"])
    run = setup(cfg, config["num_pairs"], config.get("provenance_dir"))
    feed = Feed(cfg, ray.train.get_dataset_shard("train"))
    log = MetricsLog(Path(config["metrics_file"]))
    if run.rank == 0:  # the trackers get every row metrics.jsonl gets (common.tracking.log_metrics)
        tracking.start(config.get("tracking"), config["cfg"])
    if ray.train.get_checkpoint():  # the driver shows the resume from the first record (common.progress)
        log.notes["resumed_from_step"] = run.progress.global_step
    valid = Validation(cfg, ray.train.get_dataset_shard("valid") if config.get("has_valid") else None, run.rank,
                       run.world, Path(config["metrics_file"]))
    if run.progress.global_step == 0:  # before any update: eval/loss = ln 2
        valid.evaluate(run, epoch=0)
    last: dict = {"step": run.progress.global_step}
    for epoch in range(run.progress.epoch, cfg.num_epochs):
        complete_pass = not run.progress.done_ids  # a resumed epoch sees only part of the shard
        try:
            last = train_epoch(run, feed, log, epoch, valid) or last
        except NonFiniteLoss as e:
            if run.rank == 0:  # the driver turns this into one line and exit 2 (no retries: it would recur)
                Path(config["error_file"]).write_text(str(e))
            tracking.finish()
            return
        feed.end_epoch(complete_pass)  # the reference actors stored their log-probs for the cache already
        if epoch + 1 == cfg.num_epochs:  # after the last step, unless eval_steps just did
            valid.evaluate(run, epoch)
        run.progress = Progress(epoch=epoch + 1, global_step=run.progress.global_step)
        report(run, last, merged=epoch + 1 == cfg.num_epochs)
    tracking.finish()


def train_epoch(run: Run, feed: Feed, log: MetricsLog, epoch: int, valid: Validation) -> dict | None:
    """One epoch (or what a resumed one has left): the metrics of its last logged step, None if it logged none.
    Evaluates on the held-out pairs every `eval_steps` steps. Raises NonFiniteLoss."""
    ga, p = run.cfg.gradient_accumulation_steps, run.progress
    last, micro, filler = None, 0, None
    for rows in in_lockstep(run, feed.batches(epoch, skip=set(p.done_ids), log=log)):
        if rows is None:  # this worker's share ran out first: it steps along, adding nothing
            out = forward_loss(run, filler or feed.skipped[:1])  # a share all trained before: a skipped row
            out.loss = out.loss * 0.0
        else:
            filler = rows
            p.done_ids.extend(str(r[S.PAIR_ID]) for r in rows)
            out = forward_loss(run, rows)
            log.pairs += len(rows)
        check_finite(run, out, epoch)
        if p.global_step == 0 and micro == 0:
            log.notes.update(step0_max_abs_logp_diff=step0_check(run, out), step0_loss=out.loss.item())
        (out.loss / ga).backward()
        micro += 1
        log.tokens += out.tokens
        if micro % ga == 0:
            last = optimizer_step(run, log, out, epoch) or last
            valid.after_step(run, epoch)
    if micro % ga:  # a last, partial accumulation: its gradients belong to this epoch's last step
        last = optimizer_step(run, log, out, epoch) or last
        valid.after_step(run, epoch)
    return last


# ------------------------------------------------------------------------------------------------ set-up
def build_model(cfg: DPOStageConfig, dtype: torch.dtype) -> torch.nn.Module:
    """The policy in train mode: the SFT model, with peft's LoRA (`lora_config` as is) unless full fine-tuning."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.model_id, dtype=dtype,
                                                 attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:  # non-reentrant: works with frozen embeddings (LoRA) and DDP alike
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_config is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**cfg.lora_config.model_dump()))
    if cfg.disable_dropout:  # as TRL: dropout would make policy and reference disagree on the same pair
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    return model.train()  # from_pretrained returns eval mode, where gradient checkpointing is off


def setup(cfg: DPOStageConfig, num_pairs: int, provenance_dir: str | None = None) -> Run:
    """Model (wrapped for DDP by Ray Train, sharded by common.sharding for FSDP), AdamW, the LR schedule; then the
    latest checkpoint, if Ray Train restarted this worker group or a rerun found one."""
    import ray.train
    import ray.train.torch
    from transformers import get_scheduler

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    record_provenance(provenance_dir, rank=rank)  # where this trainer ran (stage 3's manifest)
    torch.manual_seed(cfg.seed + rank)
    torch.set_num_threads(max(1, int(cfg.num_cpus_per_worker)))
    model = build_model(cfg, getattr(torch, cfg.dtype))
    head_window = supports_logits_to_keep(model.get_base_model() if hasattr(model, "get_base_model") else model)
    if cfg.strategy == "fsdp":  # FSDP2 by our code on Ray's process group (common.sharding: why not Ray's)
        model = shard_model(model, ray.train.torch.get_device(), getattr(torch, cfg.dtype),
                            reshard_after_forward=cfg.fsdp_sharding_strategy == "FULL_SHARD")
    else:
        model = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    batches = math.ceil(num_pairs // world / cfg.train_batch_size_per_device)
    steps_per_epoch = max(1, math.ceil(batches / cfg.gradient_accumulation_steps))
    total_steps = steps_per_epoch * cfg.num_epochs
    scheduler = get_scheduler(LR_SCHEDULES[cfg.lr_scheduler_type], optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    run = Run(cfg=cfg, rank=rank, world=world, model=model, optimizer=optimizer, scheduler=scheduler, params=params,
              device=next(model.parameters()).device, head_window=head_window,
              pad_id=getattr(model, "module", model).config.pad_token_id or 0, steps_per_epoch=steps_per_epoch,
              total_steps=total_steps, progress=Progress())
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            run.progress = _load_state(Path(d), run)
        if rank == 0:
            print(f"[03_dpo_train] resumed from checkpoint at epoch {run.progress.epoch + 1}, "
                  f"step {run.progress.global_step}", flush=True)
    return run


# ------------------------------------------------------------------------------------------------ batches
class Feed:
    """This worker's batches. Epoch 1 streams from the reference pool (through `get_dataset_shard`); a complete
    pass is kept, so later epochs reuse its reference log-probs instead of a second pass through the pool."""

    def __init__(self, cfg: DPOStageConfig, shard):
        self.cfg, self.shard = cfg, shard
        self.ref_done = threading.Event()  # set once this worker has received every reference log-prob it needs
        self.kept: list[dict] | None = None  # this worker's rows of a complete first pass
        self.seen: list[dict] = []  # this epoch's rows, while streaming
        self.skipped: list[dict] = []  # a row a resumed epoch skipped: what an idle worker steps along with

    def batches(self, epoch: int, skip: set[str], log: MetricsLog) -> Iterator[list[dict]]:
        """Batches of `train_batch_size_per_device` pairs. `skip`: pairs this epoch already trained on before a
        restart (from the checkpoint), left out by id, so a resumed epoch sees every other pair exactly once."""
        bs, rows = self.cfg.train_batch_size_per_device, self._rows(epoch)
        while True:
            self._use_free_cores()
            t_wait = time.time()
            batch = _next_batch(rows, bs, skip, self.skipped)
            log.ref_wait += time.time() - t_wait  # time blocked on the reference pool
            if not batch:
                return
            log.ref_pids.update(int(r[S.REF_PID]) for r in batch)
            if self.kept is None:
                self.seen.extend(batch)
            yield batch

    def end_epoch(self, complete_pass: bool) -> list[dict] | None:
        """After an epoch: the rows newly kept for later epochs (a complete streamed pass), else None."""
        seen, self.seen = self.seen, []
        if self.kept is not None or not complete_pass:
            return None
        self.kept = seen
        return seen

    def _rows(self, epoch: int) -> Iterator[dict]:
        if self.kept is not None:  # reference log-probs already known: no second pass through the pool
            rows = list(self.kept)
            random.Random(self.cfg.seed * 1000 + epoch).shuffle(rows)
            return iter(rows)
        bs = self.cfg.train_batch_size_per_device
        if self.cfg.cpu_threads_after_reference:
            return _drained(self.shard, bs, self.ref_done)
        return (r for b in self.shard.iter_batches(batch_size=bs, batch_format="numpy", prefetch_batches=2)
                for r in _split(b))

    def _use_free_cores(self) -> None:
        after = self.cfg.cpu_threads_after_reference
        if after and (self.ref_done.is_set() or self.kept is not None) and torch.get_num_threads() != after:
            torch.set_num_threads(after)  # the reference pool is done: its cores are free


def in_lockstep(run: Run, batches: Iterator[list[dict]]) -> Iterator[list[dict] | None]:
    """The batches, while any worker still has one; None on a worker whose share ran out before the others'.
    A fresh epoch splits the pairs equally, so this never yields None. An epoch resumed mid-way skips the pairs
    every worker had trained on (the checkpoint holds all of them), and the workers' shares of what is left can
    differ: every worker still takes the same number of steps, so every collective (DDP's gradient all-reduce,
    the metrics) meets."""
    for rows in batches:
        if run.world > 1:
            _workers_with_a_batch(run, True)
        yield rows
    while run.world > 1 and _workers_with_a_batch(run, False):
        yield None


def _workers_with_a_batch(run: Run, have: bool) -> int:
    import torch.distributed as dist

    flag = torch.tensor([float(have)], device=run.device)  # NCCL takes device tensors only
    dist.all_reduce(flag)
    return int(flag.item())


def _next_batch(rows: Iterator[dict], bs: int, skip: set[str], skipped: list[dict]) -> list[dict]:
    """The next `bs` rows not in `skip`; fewer only at the end of the epoch, none after it. The first skipped row is
    kept in `skipped`."""
    batch: list[dict] = []
    for r in rows:
        if str(r[S.PAIR_ID]) in skip:
            if not skipped:
                skipped.append(r)
        else:
            batch.append(r)
            if len(batch) == bs:
                break
    return batch


def _split(batch: dict[str, np.ndarray]) -> list[dict]:
    return [{k: batch[k][i] for k in BATCH_COLUMNS} for i in range(len(batch[S.PAIR_ID]))]


def _drained(shard, bs: int, ref_done: threading.Event) -> Iterator[dict]:
    """The shard's rows, one by one, while a thread pulls the whole stream ahead of training. The reference pool then
    never waits for the trainer, and `ref_done` is set the moment the reference pass is over: from then on its
    cores are idle, and the trainer may take them (`cpu_threads_after_reference`)."""
    rows: queue.Queue = queue.Queue()
    end = object()

    def pull():
        try:
            for b in shard.iter_batches(batch_size=bs, batch_format="numpy", prefetch_batches=2):
                for r in _split(b):
                    rows.put(r)
        except BaseException as e:  # re-raised in the training thread, where Ray Train handles it
            rows.put(e)
        finally:
            ref_done.set()
            rows.put(end)

    threading.Thread(target=pull, name="reference-drain", daemon=True).start()
    while (row := rows.get()) is not end:
        if isinstance(row, BaseException):
            raise row
        yield row


# ------------------------------------------------------------------------------------------------ one step
def forward_loss(run: Run, rows: list[dict]) -> StepOutput:
    """Concatenated forward of prompt+chosen and prompt+rejected (one batch of 2B rows), summed response log-probs
    (the function the reference actors use too), the DPO loss against the reference log-probs that came with the
    rows."""
    ptc, b = run.cfg.preference_tuning_config, len(rows)
    ids, attn, mask = collate_pairs([r[S.PROMPT_IDS] for r in rows], [r[S.CHOSEN_IDS] for r in rows],
                                    [r[S.REJECTED_IDS] for r in rows], run.pad_id)
    ids, attn, mask = ids.to(run.device), attn.to(run.device), mask.to(run.device)
    logps, ntok, logit_sums = model_logps(run.model, ids, attn, mask, run.head_window)
    ref_c, ref_r = (torch.as_tensor(np.asarray([r[k] for r in rows], dtype=np.float32), device=run.device)
                    for k in (S.REF_CHOSEN_LOGPS, S.REF_REJECTED_LOGPS))
    losses, r_c, r_r = dpo_loss(logps[:b], logps[b:], ref_c, ref_r, beta=ptc.beta, loss_type=ptc.loss_type,
                                label_smoothing=ptc.label_smoothing,
                                chosen_num_tokens=ntok[:b], rejected_num_tokens=ntok[b:])
    pol_c, pol_r = logps[:b].detach(), logps[b:].detach()
    return StepOutput(
        loss=losses.mean(), chosen_rewards=r_c, rejected_rewards=r_r, chosen_logps=pol_c, rejected_logps=pol_r,
        # TRL's logits/*: a mean over the batch's response tokens, not a mean of per-sequence means
        chosen_logits=logit_sums[:b].sum() / ntok[:b].sum().clamp(min=1),
        rejected_logits=logit_sums[b:].sum() / ntok[b:].sum().clamp(min=1),
        max_abs_logp_diff=torch.cat([(pol_c - ref_c).abs(), (pol_r - ref_r).abs()]).max(),
        tokens=int(attn.sum()), pair_ids=[str(r[S.PAIR_ID]) for r in rows])


def check_finite(run: Run, out: StepOutput, epoch: int) -> None:
    """Raise NonFiniteLoss on every rank if any rank's loss is not finite (one rank stopping alone hangs DDP)."""
    import torch.distributed as dist

    bad = (~torch.isfinite(out.loss.detach())).float().reshape(1).to(run.device)  # NCCL takes device tensors only
    if run.world > 1:
        dist.all_reduce(bad)
    if bad.item() > 0:
        raise NonFiniteLoss(f"non-finite loss at step {run.progress.global_step} (epoch {epoch + 1}), batch of "
                            f"pairs {out.pair_ids[:4]}; lower learning_rate or check these pairs")


def step0_check(run: Run, out: StepOutput) -> float:
    """Before any update the policy is the reference (unless reference_model_id differs): the largest |policy -
    reference| log-prob over every worker's first batch. Rank 0 prints it, and warns past `step0_tolerance`."""
    import torch.distributed as dist

    diff = out.max_abs_logp_diff.float().reshape(1).to(run.device)
    if run.world > 1:
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    diff, cfg = diff.item(), run.cfg
    if run.rank == 0:
        same = cfg.reference_model_id in (None, cfg.model_id)
        print(f"[03_dpo_train] step-0 check: max |policy - reference| log-prob = {diff:.2e} "
              f"(loss {out.loss.item():.4f}, ln 2 = {math.log(2):.4f})", flush=True)
        tol = cfg.preference_tuning_config.step0_tolerance
        if same and diff > tol:
            print(f"[03_dpo_train] WARNING: policy and reference disagree by {diff:.3g} > "
                  f"{tol} at step 0 although they are the same model: check dtype, "
                  f"chat template and padding (NeMo-Aligner #227)", flush=True)
    return diff


def optimizer_step(run: Run, log: MetricsLog, out: StepOutput, epoch: int) -> dict | None:
    """Clip, step, schedule, advance `run.progress`; then log and checkpoint when due. The metrics if logged."""
    # Under FSDP the parameters are DTensors, and clip_grad_norm_ reduces their shards' norms over the ranks: the
    # global norm, as under DDP (tests/test_fsdp.py compares the two curves).
    torch.nn.utils.clip_grad_norm_(run.params, run.cfg.max_grad_norm)
    run.optimizer.step()
    if run.progress.global_step < run.total_steps:  # a resumed epoch may take a step more than planned
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    p = run.progress
    p.global_step += 1
    p.step_in_epoch += 1
    end_of_epoch = p.step_in_epoch == run.steps_per_epoch
    if p.global_step % run.cfg.logging_steps and not end_of_epoch:
        return None
    m = log.write(run, out, epoch)
    if not end_of_epoch:  # the epoch's end reports with its own checkpoint (train_loop_per_worker)
        every = run.cfg.checkpoint_every_n_steps
        report(run, m, merged=False, checkpoint=bool(every) and p.global_step % every == 0)
    return m


# ------------------------------------------------------------------------------------------------ log, checkpoint
class MetricsLog:
    """Per-step metrics, averaged over the workers; rank 0 appends them to metrics.jsonl and prints one line.
    Between two lines it counts tokens, the time spent waiting for reference data and the wall time."""

    def __init__(self, path: Path):
        self.path = path
        self.ref_pids: set[int] = set()  # reference actor processes whose log-probs this worker trained on
        self._new_window()

    def _new_window(self) -> None:
        self.start, self.tokens, self.pairs, self.ref_wait = time.time(), 0, 0, 0.0
        self.notes: dict = {}  # what the next record also carries: a resume, the step-0 check (common.progress)

    def write(self, run: Run, out: StepOutput, epoch: int) -> dict:
        dt = max(time.time() - self.start, 1e-9)
        means = _mean_over_workers(run, {
            **dpo_metrics(out.loss.detach(), out.chosen_rewards, out.rejected_rewards, out.chosen_logps,
                          out.rejected_logps, out.chosen_logits, out.rejected_logits),
            "tokens_per_second_per_worker": self.tokens / dt, "ref_wait_seconds": self.ref_wait,
            "step_seconds": dt / run.cfg.logging_steps, "pairs": self.pairs})
        means["pairs"] = round(means["pairs"] * run.world)  # pairs trained since the last record, by every worker
        m = {**means, "step": run.progress.global_step, "total_steps": run.total_steps, "epoch": epoch + 1,
             "lr": run.scheduler.get_last_lr()[0], "trainer_pid": os.getpid(), "ref_pids": sorted(self.ref_pids),
             "torch_threads": torch.get_num_threads(), **self.notes}
        if run.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(m) + "\n")
            print(step_line(m), flush=True)  # to Ray's log files; the driver shows it (common.progress)
            tracking.log_metrics(m)
        self._new_window()
        return m


def _mean_over_workers(run: Run, values: dict[str, float]) -> dict[str, float]:
    """Every rank calls this at the same step with the same keys (a collective)."""
    import torch.distributed as dist

    if run.world == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    return dict(zip(values, (t / run.world).tolist()))


def report(run: Run, metrics: dict, merged: bool, checkpoint: bool = True) -> None:
    """Hand `metrics` to Ray Train, with a checkpoint written by rank 0 (`merged`: plus the final HF model). Under
    FSDP every rank first takes part in gathering the state onto rank 0."""
    import ray.train

    if checkpoint and run.world > 1:  # the pairs every worker trained on this epoch: a resume skips them all
        import torch.distributed as dist

        shares: list = [None] * run.world
        dist.all_gather_object(shares, run.progress.done_ids)
        run.progress.done_ids = sorted({i for share in shares for i in share})
    state = _gather_state(run, merged) if checkpoint else None
    if run.rank != 0 or not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        _save_state(Path(d), run, merged, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _gather_state(run: Run, merged: bool) -> dict | None:
    """What rank 0 writes: trainable weights, optimizer state and, with `merged`, every weight (FSDP only; under
    DDP rank 0 holds them all already). Collective under FSDP; None on the other ranks."""
    from common import sharding

    if run.cfg.strategy != "fsdp":
        if run.rank != 0:
            return None
        inner = getattr(run.model, "module", run.model)  # unwrap DDP
        return {"trainable": {k: v.detach().cpu().contiguous() for k, v in inner.named_parameters()
                              if v.requires_grad},
                "optimizer": run.optimizer.state_dict(), "model": inner}
    state = {"trainable": sharding.trainable_state(run.model),
             "optimizer": sharding.optimizer_state(run.model, run.optimizer)}
    if merged:
        full = sharding.full_model_state(run.model)
        if run.rank == 0:  # a plain (unsharded) copy of the policy on the CPU, for save_pretrained
            state["model"] = build_model(run.cfg, getattr(torch, run.cfg.dtype))
            state["model"].load_state_dict(full)
    return state if run.rank == 0 else None


def _save_state(path: Path, run: Run, merged: bool, state: dict) -> None:
    """Adapter (LoRA) or full weights + optimizer + position; with `merged`, also a plain HF folder of the final
    model that transformers and vLLM load as is. `state`: from `_gather_state`."""
    from safetensors.torch import save_file

    save_file(state["trainable"], str(path / "trainable.safetensors"))
    torch.save({"optimizer": state["optimizer"], "scheduler": run.scheduler.state_dict(),
                "strategy": run.cfg.strategy}, path / "optimizer.pt")
    (path / "state.json").write_text(json.dumps(asdict(run.progress)))
    if merged:
        from transformers import AutoTokenizer

        inner = state["model"]
        if hasattr(inner, "merge_and_unload"):
            inner.save_pretrained(path / "adapter")
            inner = inner.merge_and_unload()
        inner.config.use_cache = True
        inner.save_pretrained(path / "model")
        AutoTokenizer.from_pretrained(run.cfg.model_id).save_pretrained(path / "model")


def _load_state(path: Path, run: Run) -> Progress:
    """Every rank reads the checkpoint; under FSDP each keeps its shard. The optimizer state's layout follows the
    strategy that wrote it (FSDP: keyed by parameter name), so a run resumes under the strategy it started with."""
    from safetensors.torch import load_file

    from common import sharding

    trainable = load_file(str(path / "trainable.safetensors"))
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    wrote = opt.get("strategy", "ddp")
    if wrote != run.cfg.strategy:
        raise UserError(f"the checkpoint this run resumes from was written under strategy: {wrote}; resume with "
                        f"--set strategy={wrote}, or start over with --force")
    if run.cfg.strategy == "fsdp":
        sharding.load_state(run.model, run.optimizer, trainable, opt["optimizer"])
    else:
        inner = getattr(run.model, "module", run.model)
        missing = inner.load_state_dict(trainable, strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys
        run.optimizer.load_state_dict(opt["optimizer"])
    run.scheduler.load_state_dict(opt["scheduler"])
    return Progress(**json.loads((path / "state.json").read_text()))

