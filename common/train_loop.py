"""The DPO training loop that runs in each Ray Train worker. It never loads the reference model: reference log-probs
arrive with every batch from the reference actor pool (common.reference), through `get_dataset_shard`.

Per step: concatenated forward of prompt+chosen and prompt+rejected (one batch of 2B rows), summed response
log-probs (common.dpo_loss.model_logps, the same function the reference actors use), the DPO loss, backward,
clip, step. Epoch 1 streams from the reference pool; the worker keeps its shard's rows, so later epochs reuse the
reference log-probs instead of recomputing them. Checkpoints hold the adapter (or full weights), the optimizer and
the position; after a worker failure Ray Train restarts the group from the latest one.
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
from pathlib import Path

import numpy as np
import torch

from common import schema as S
from common.dpo_loss import dpo_loss, dpo_metrics, model_logps, supports_logits_to_keep
from common.reference import record_provenance
from common.tokenize import collate_pairs

BATCH_COLUMNS = [S.PROMPT_IDS, S.CHOSEN_IDS, S.REJECTED_IDS, S.REF_CHOSEN_LOGPS, S.REF_REJECTED_LOGPS, S.PAIR_ID,
                 S.REF_PID]


def _build_model(cfg, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.model_id, dtype=dtype)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:  # non-reentrant: works with frozen embeddings (LoRA) and DDP alike
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_config is not None:
        from peft import LoraConfig, get_peft_model

        lc = cfg.lora_config
        model = get_peft_model(model, LoraConfig(
            r=lc.r, lora_alpha=lc.lora_alpha, lora_dropout=lc.lora_dropout, target_modules=lc.target_modules,
            task_type=lc.task_type, bias=lc.bias, modules_to_save=lc.modules_to_save or None))
    if cfg.disable_dropout:  # as TRL: dropout would make policy and reference disagree on the same pair
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    return model.train()  # from_pretrained returns eval mode, where gradient checkpointing is off


def _drained(shard, bs: int, ref_done: threading.Event):
    """The shard's rows, one by one, while a thread pulls the whole stream ahead of training. The reference pool then
    never waits for the trainer, and `ref_done` is set the moment the reference pass is over: from then on its
    cores are idle, and the trainer may take them (`cpu_threads_after_reference`)."""
    rows: queue.Queue = queue.Queue()
    end = object()

    def pull():
        try:
            for b in shard.iter_batches(batch_size=bs, batch_format="numpy", prefetch_batches=2):
                for i in range(len(b[S.PAIR_ID])):
                    rows.put({k: b[k][i] for k in BATCH_COLUMNS})
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


def _lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        frac = (step - warmup) / max(1, total - warmup)
        return {"constant": 1.0, "linear": max(0.0, 1 - frac), "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[kind]
    return f


def _save_state(path: Path, model, optimizer, scheduler, state: dict, merged: bool, tokenizer_src: str):
    """Adapter (LoRA) or full weights + optimizer + position; with `merged`, also a plain HF folder of the final
    model that transformers and vLLM load as is."""
    from safetensors.torch import save_file

    inner = getattr(model, "module", model)  # unwrap DDP
    trainable = {k: v.detach().cpu().contiguous() for k, v in inner.named_parameters() if v.requires_grad}
    save_file(trainable, str(path / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path / "optimizer.pt")
    (path / "state.json").write_text(json.dumps(state))
    if merged:
        from transformers import AutoTokenizer

        if hasattr(inner, "merge_and_unload"):
            inner.save_pretrained(path / "adapter")
            inner = inner.merge_and_unload()
        inner.config.use_cache = True
        inner.save_pretrained(path / "model")
        AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(path / "model")


def _load_state(path: Path, model, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    inner = getattr(model, "module", model)
    missing = inner.load_state_dict(load_file(str(path / "trainable.safetensors")), strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return json.loads((path / "state.json").read_text())


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    from common.config import DPOStageConfig

    cfg = DPOStageConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    record_provenance(config.get("provenance_dir"), rank=rank)
    torch.manual_seed(cfg.seed + rank)
    torch.set_num_threads(max(1, int(config.get("torch_threads", cfg.num_cpus_per_worker))))
    dtype = getattr(torch, cfg.dtype)
    ptc = cfg.preference_tuning_config
    metrics_path = Path(config["metrics_file"])
    ref_cache_dir = Path(config["ref_cache_tmp"]) if config.get("ref_cache_tmp") else None

    model = _build_model(cfg, dtype)
    head_window = supports_logits_to_keep(model.get_base_model() if hasattr(model, "get_base_model") else model)
    model = ray.train.torch.prepare_model(model, parallel_strategy=cfg.strategy)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    bs, ga = cfg.train_batch_size_per_device, cfg.gradient_accumulation_steps
    rows_per_worker = config["num_pairs"] // world
    steps_per_epoch = max(1, math.ceil(math.ceil(rows_per_worker / bs) / ga))
    total_steps = steps_per_epoch * cfg.num_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.lr_scheduler_type, cfg.warmup_steps, total_steps))

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = _load_state(Path(d), model, optimizer, scheduler)
        if rank == 0:
            print(f"[03_dpo_train] resumed from checkpoint at epoch {state['epoch'] + 1}, "
                  f"step {state['global_step']}", flush=True)

    shard = ray.train.get_dataset_shard("train")
    ref_done = threading.Event()  # set once this worker has received every reference log-prob it will need
    kept_rows: list[dict] | None = None  # this worker's rows of a complete first pass, reused by later epochs

    def epoch_batches(epoch: int, skip: set[str]):
        """Batches of `bs` pairs. `skip`: pairs this epoch already trained on before a restart (from the
        checkpoint), left out by id, so a resumed epoch sees every other pair exactly once."""
        if kept_rows is not None:  # reference log-probs already known: no second pass through the pool
            rows = list(kept_rows)
            random.Random(cfg.seed * 1000 + epoch).shuffle(rows)
            source = iter([rows])
        elif cfg.cpu_threads_after_reference:
            source = ([r] for r in _drained(shard, bs, ref_done))
        else:
            source = ({k: b[k][i] for k in BATCH_COLUMNS} for b in shard.iter_batches(
                batch_size=bs, batch_format="numpy", prefetch_batches=2) for i in range(len(b[S.PAIR_ID])))
            source = ([r] for r in source)
        buf: list[dict] = []
        for rows in source:
            buf.extend(r for r in rows if str(r[S.PAIR_ID]) not in skip)
            while len(buf) >= bs:
                yield buf[:bs]
                buf = buf[bs:]
        if buf:
            yield buf

    pad_id = getattr(model, "module", model).config.pad_token_id or 0
    t_log = time.time()
    window = {"tokens": 0, "ref_wait": 0.0}
    last_metrics: dict = {"step": state["global_step"]}
    ref_pids: set[int] = set()
    for epoch in range(state["epoch"], cfg.num_epochs):
        streamed = kept_rows is None  # this epoch pulls from the reference pool
        done = state.setdefault("done_ids", [])  # pair ids trained on in this epoch (kept in checkpoints)
        resumed = bool(done)  # a resumed epoch sees only part of the shard: not a complete first pass
        seen: list[dict] = []
        it = iter(epoch_batches(epoch, set(done)))
        micro = 0
        while True:
            after = cfg.cpu_threads_after_reference
            if after and (ref_done.is_set() or not streamed) and torch.get_num_threads() != after:
                torch.set_num_threads(after)  # the reference pool is done: its cores are free
            t_wait = time.time()
            rows = next(it, None)
            window["ref_wait"] += time.time() - t_wait  # time blocked on the reference pool
            if rows is None:
                break
            batch = {k: [r[k] for r in rows] for k in BATCH_COLUMNS}
            ref_pids.update(int(x) for x in batch[S.REF_PID])
            if streamed:
                seen.extend(rows)
            done.extend(str(p) for p in batch[S.PAIR_ID])
            ids, attn, mask = collate_pairs(batch[S.PROMPT_IDS], batch[S.CHOSEN_IDS], batch[S.REJECTED_IDS], pad_id)
            ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
            b = len(batch[S.PROMPT_IDS])
            logps, ntok, logits, mask = model_logps(model, ids, attn, mask, head_window)
            ref_c = torch.as_tensor(np.asarray(batch[S.REF_CHOSEN_LOGPS], dtype=np.float32), device=device)
            ref_r = torch.as_tensor(np.asarray(batch[S.REF_REJECTED_LOGPS], dtype=np.float32), device=device)
            losses, r_c, r_r = dpo_loss(logps[:b], logps[b:], ref_c, ref_r, beta=ptc.beta, loss_type=ptc.loss_type,
                                        label_smoothing=ptc.label_smoothing,
                                        chosen_num_tokens=ntok[:b], rejected_num_tokens=ntok[b:])
            loss = losses.mean()
            bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0])
            if world > 1:
                dist.all_reduce(bad)  # every rank stops together, or DDP would hang
            if bad.item() > 0:
                pairs = [str(p) for p in batch[S.PAIR_ID]][:4]
                msg = (f"non-finite loss at step {state['global_step']} (epoch {epoch + 1}), batch of pairs "
                       f"{pairs}; lower learning_rate or check these pairs")
                if rank == 0:  # the driver turns this into one line and exit 2 (no retries: it would recur)
                    Path(config["error_file"]).write_text(msg)
                return
            if state["global_step"] == 0 and micro == 0:
                diff = torch.cat([(logps[:b] - ref_c).abs(), (logps[b:] - ref_r).abs()]).max().item()
                window["step0_max_abs_logp_diff"] = diff
                if rank == 0:
                    same = cfg.reference_model_id in (None, cfg.model_id)
                    print(f"[03_dpo_train] step-0 check: max |policy - reference| log-prob = {diff:.2e} "
                          f"(loss {loss.item():.4f}, ln 2 = {math.log(2):.4f})", flush=True)
                    if same and diff > ptc.step0_tolerance:
                        print(f"[03_dpo_train] WARNING: policy and reference disagree by {diff:.3g} > "
                              f"{ptc.step0_tolerance} at step 0 although they are the same model: check dtype, "
                              f"chat template and padding (NeMo-Aligner #227)", flush=True)
            (loss / ga).backward()
            micro += 1
            window["tokens"] += int(attn.sum())
            if micro % ga:
                continue
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            if state["global_step"] % cfg.logging_steps == 0 or state["step_in_epoch"] == steps_per_epoch:
                dt = max(time.time() - t_log, 1e-9)
                with torch.no_grad():
                    logit_means = [logits[:b][mask[:b]].mean(), logits[b:][mask[b:]].mean()]
                m = dpo_metrics(loss.detach(), r_c, r_r, logps[:b].detach(), logps[b:].detach(), *logit_means)
                m.update({"step": state["global_step"], "epoch": epoch + 1, "lr": scheduler.get_last_lr()[0],
                          "tokens_per_second_per_worker": window["tokens"] / dt,
                          "ref_wait_seconds": window["ref_wait"], "step_seconds": dt / cfg.logging_steps,
                          "trainer_pid": os.getpid(), "ref_pids": sorted(ref_pids),
                          "torch_threads": torch.get_num_threads()})
                if "step0_max_abs_logp_diff" in window:
                    m["step0_max_abs_logp_diff"] = window.pop("step0_max_abs_logp_diff")
                if rank == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(m) + "\n")
                    print(f"[03_dpo_train] epoch {epoch + 1} step {state['global_step']}/{total_steps} "
                          f"loss {m['loss']:.4f} acc {m['rewards/accuracies']:.2f} "
                          f"margin {m['rewards/margins']:+.4f} lr {m['lr']:.2e} "
                          f"tok/s {m['tokens_per_second_per_worker']:.0f} ref-wait {m['ref_wait_seconds']:.1f}s",
                          flush=True)
                t_log, window = time.time(), {"tokens": 0, "ref_wait": 0.0}
                every = cfg.checkpoint_every_n_steps
                if every and state["global_step"] % every == 0 and state["step_in_epoch"] < steps_per_epoch:
                    _report(m, state, model, optimizer, scheduler, rank, cfg, merged=False)
                elif state["step_in_epoch"] < steps_per_epoch:
                    ray.train.report(m)
                last_metrics = m
        if streamed and not resumed:
            kept_rows = seen
            if ref_cache_dir is not None:
                _write_ref_cache(seen, ref_cache_dir, rank)
        state.update(epoch=epoch + 1, step_in_epoch=0, done_ids=[])
        _report(last_metrics, state, model, optimizer, scheduler, rank, cfg, merged=epoch + 1 == cfg.num_epochs)


def _report(metrics, state, model, optimizer, scheduler, rank, cfg, merged):
    import ray.train
    from ray.train import Checkpoint

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        _save_state(Path(d), model, optimizer, scheduler, dict(state), merged, cfg.model_id)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def _write_ref_cache(rows: list[dict], folder: Path, rank: int) -> None:
    """This worker's share of the reference log-probs; the driver assembles the shares into the cache."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        S.PAIR_ID: [str(r[S.PAIR_ID]) for r in rows],
        S.REF_CHOSEN_LOGPS: [float(r[S.REF_CHOSEN_LOGPS]) for r in rows],
        S.REF_REJECTED_LOGPS: [float(r[S.REF_REJECTED_LOGPS]) for r in rows],
    })
    pq.write_table(table, folder / f"rank-{rank}.parquet")
