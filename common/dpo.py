"""Stage 3's driver-side library: the resource plan, the pairs, their tokenisation, the reference log-prob cache
and the summary of a finished run. The order of work is the recipe's (03_dpo_train/train.py); the Ray Train worker
is common.train_loop, the reference actors are common.reference.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common import schema as S
from common.capacity import describe, pool_balance
from common.config import FSDP_WORDS, DPOStageConfig, resolve
from common.data import num_blocks
from common.errors import UserError
from common.io import fingerprint
from common.pairs import Pairs, read_pairs, scan_pairs, shuffle_key
from common.ray_setup import Ask, off_driver
from common.tokenize import DROP_EMPTY, DROP_IDENTICAL, TOKENIZATION_VERSION, load_tokenizer, tokenize_pairs_batch


def plan(cfg: DPOStageConfig) -> list[Ask]:
    """The Ray workers stage 3 starts. A GPU count still `auto` shows the GPU cluster's plan (plan_notes says so)."""
    sc = cfg.preference_tuning_config.logprob_processor_scaling_config
    lo = sc.concurrency if isinstance(sc.concurrency, int) else sc.concurrency[0]
    ref_gpus = 1.0 if sc.num_gpus == "auto" else sc.num_gpus
    worker = {"CPU": cfg.num_cpus_per_worker, **({"GPU": 1.0} if cfg.use_gpu else {}), **cfg.worker_resources}
    ref = {"CPU": sc.num_cpus, **({"GPU": ref_gpus} if ref_gpus else {}), **sc.custom_resources}
    backend = cfg.preference_tuning_config.reference_backend
    strategy = cfg.strategy if cfg.strategy == "ddp" else f"fsdp {FSDP_WORDS[cfg.fsdp_sharding_strategy]}"
    return [
        Ask(f"DPO train worker ({strategy})", cfg.num_devices, worker),
        Ask(f"reference log-prob actor ({backend})", lo, ref),
        Ask("tokenize / read task", 1, {"CPU": 0.25}),
    ]


def plan_notes(cfg: DPOStageConfig) -> list[str]:
    """What the plan's lines do not show: LLMForge keys mapped to ours, and GPU counts resolved at run time."""
    notes = []
    if cfg.deepspeed is not None:
        ds = cfg.deepspeed
        to = "DDP (nothing sharded)" if cfg.strategy == "ddp" else \
            f"FSDP {FSDP_WORDS[cfg.fsdp_sharding_strategy]} ({cfg.fsdp_sharding_strategy})"
        if ds.zero_stage == 1:
            to += ", the nearest: FSDP has no optimizer-only sharding"
        notes.append(f"deepspeed ZeRO-{ds.zero_stage} ({ds.config_path}) -> {to}")
    if cfg.attn_implementation:
        notes.append(f"attention: {cfg.attn_implementation} (policy and reference)")
    sc = cfg.preference_tuning_config.logprob_processor_scaling_config
    auto = [what for what, v in (("trainer", cfg.use_gpu), ("reference actor", sc.num_gpus)) if v == "auto"]
    if auto:
        notes.append(f"GPUs auto: 1 GPU per {' / per '.join(auto)} if the cluster has GPUs, else CPU "
                     f"(resolved when Ray starts; set use_gpu / logprob_processor_scaling_config.num_gpus to fix it)")
    actors = sc.concurrency if isinstance(sc.concurrency, int) else sc.concurrency[1]
    ref_gpus = (1.0 if sc.num_gpus == "auto" else sc.num_gpus) * cfg.preference_tuning_config.\
        reference_tensor_parallel_size
    balance = pool_balance(gpu=cfg.use_gpu is not False, trainers=cfg.num_devices,
                           worker_resources=cfg.worker_resources, trainer_cpus=cfg.num_cpus_per_worker,
                           actors=actors, actor_resources=sc.custom_resources, actor_cpus=sc.num_cpus,
                           actor_gpus=ref_gpus, lora=cfg.lora_config is not None,
                           gradient_checkpointing=cfg.gradient_checkpointing)
    if balance:
        notes.append(describe(balance, actors, cfg.num_devices))
    return notes


def gpus_are_auto(cfg: DPOStageConfig) -> bool:
    return "auto" in (cfg.use_gpu, cfg.preference_tuning_config.logprob_processor_scaling_config.num_gpus)


def resolve_gpus(cfg: DPOStageConfig, cluster_gpus: float) -> tuple[DPOStageConfig, str | None]:
    """`auto` GPU counts made concrete for a Ray cluster with `cluster_gpus` GPUs (as LLMForge: one GPU per trainer
    and per reference actor when there are GPUs, CPU when there are none). Returns the config and what was chosen."""
    if not gpus_are_auto(cfg):
        return cfg, None
    ptc = cfg.preference_tuning_config
    sc = ptc.logprob_processor_scaling_config
    has = cluster_gpus > 0
    sc = sc.model_copy(update={"num_gpus": (1.0 if has else 0.0) if sc.num_gpus == "auto" else sc.num_gpus})
    cfg = cfg.model_copy(update={
        "use_gpu": has if cfg.use_gpu == "auto" else cfg.use_gpu,
        "preference_tuning_config": ptc.model_copy(update={"logprob_processor_scaling_config": sc})})
    where = "1 GPU per trainer / per reference actor" if has else "CPU trainers and reference actors"
    return cfg, f"GPUs auto: the cluster has {cluster_gpus:g} GPU(s) -> {where}"


def load_pairs(cfg: DPOStageConfig, upstream: dict | None) -> tuple[Pairs, dict]:
    """The pairs, checked where they lie (common.pairs: in batches, nothing per pair kept but a hash of its id),
    with the input's identity."""
    if upstream is not None:
        path = Path(upstream["dir"]) / "data"
        source = {"dir": upstream["dir"], "fingerprint": upstream["fingerprint"]}
        where = label = f"{upstream['dir']}"
    else:
        path = resolve(cfg.train_path)
        if not path.exists():
            raise UserError(f"train_path {cfg.train_path} not found; give a jsonl/parquet of prompt/chosen/rejected")
        source = {"dir": cfg.train_path, "fingerprint": fingerprint(path)}
        where, label = cfg.train_path, "train_path"
    pairs = scan_pairs(path, label, where, "nothing to train on (rerun 02_judge with looser pairing rules)")
    check_pairs(pairs, cfg, where)
    return pairs, source


def load_valid_pairs(cfg: DPOStageConfig, upstream: dict | None) -> tuple[Pairs, dict] | None:
    """The held-out pairs and their identity: `valid_path`, else the share stage 2 held out
    (`pairing.valid_fraction`); None when there are neither (no validation)."""
    if cfg.valid_path:
        path, where, label = resolve(cfg.valid_path), cfg.valid_path, "valid_path"
        if not path.exists():
            raise UserError(f"valid_path {cfg.valid_path} not found; give a jsonl/parquet of prompt/chosen/rejected")
    elif upstream is not None and upstream.get("valid_pairs"):
        path = Path(upstream["valid_pairs"])
        where = label = str(path)
    else:
        return None
    pairs = scan_pairs(path, label, str(where), "nothing to validate on (set valid_path: null to train without it)")
    return pairs, {"dir": str(where), "fingerprint": fingerprint(path)}


def check_pairs(pairs: Pairs, cfg: DPOStageConfig, where: str) -> None:
    """Before Ray starts (pair ids are unique: scan_pairs checked): enough pairs with two non-empty, different
    responses to train at all (the others are dropped by the tokeniser and counted; this only refuses a run that
    would keep too few). Whether the rest fit context_length is the tokeniser's to say, in Ray."""
    if pairs.empty == pairs.count:
        raise UserError(f"{where}: all {pairs.count} pairs have an empty chosen or rejected response; check the "
                        f"pairs (stage 2's filters.min_words drops empty candidates)")
    if pairs.identical == pairs.count:
        raise UserError(f"{where}: all {pairs.count} pairs have chosen identical to rejected, so DPO has nothing to "
                        f"learn from; check how the pairs were made (chosen must be the preferred, different answer)")
    dropped = {"with an empty response": pairs.empty, "with chosen identical to rejected": pairs.identical}
    note = ", ".join(f"{n} {what}" for what, n in dropped.items() if n)
    check_enough_pairs(pairs.count - pairs.empty - pairs.identical, cfg, where, f" ({note} dropped)" if note else "")


def check_enough_pairs(num_pairs: int, cfg: DPOStageConfig, where: str, note: str = "") -> None:
    """Every worker needs one full batch, or the run takes no optimizer step and still reports a model."""
    need = cfg.num_devices * cfg.train_batch_size_per_device
    if num_pairs < need:
        raise UserError(f"{where}: {num_pairs} trainable pairs{note} but one step needs num_devices "
                        f"({cfg.num_devices}) x train_batch_size_per_device ({cfg.train_batch_size_per_device}) = "
                        f"{need}; give more pairs or lower train_batch_size_per_device / num_devices")


def tokenize_pairs(pairs: Pairs, cfg: DPOStageConfig, tokenizer_path: str, where: str):
    """Ray Data, from the files: read, tokenise every pair with common.tokenize (the one function), shuffle with the
    config's seed, drop what does not fit (counted). Returns (materialised dataset of kept pairs, {reason: count})."""
    blocks = num_blocks(len(pairs), cfg.num_devices, per_worker=cfg.num_data_blocks_per_device)
    # batch_size=None: one batch per block. A row count here would bundle small blocks into one, and the reference
    # pool would then get the epoch as a single block: the trainer's first batch would wait for the whole pass.
    ds = read_pairs(pairs, blocks).map_batches(
        _tokenize_batch, batch_size=None, num_cpus=0.25,
        fn_kwargs=dict(tokenizer_path=tokenizer_path, max_length=cfg.context_length,
                       max_prompt_length=cfg.max_prompt_length, truncation=cfg.truncation, seed=cfg.seed))
    # One fixed shuffle (pairs of one prompt sit together in stage 2's output): a Ray Data sort on a seeded hash of
    # each pair id, so the order depends on the pairs and the seed alone, not on how many files stage 2 wrote or in
    # which order its tasks finished. A sort is an all-to-all, which needs free CPUs for its tasks; it runs here,
    # materialised before the reference pool and the trainers take the CPUs, so it cannot wait on them (on 2 cores
    # as on a cluster). Ordered execution (preserve_order, for this dataset only) keeps the sorted blocks in order.
    ctx = ds.context.execution_options
    ordered, ctx.preserve_order = ctx.preserve_order, True
    try:
        # The sort's blocks are uneven and as many as the read made (a parquet row group is one): repartition (a
        # split, no second shuffle) gives the pool `blocks` even ones.
        ds = ds.sort(S.SHUFFLE_KEY).repartition(blocks).materialize()
        drops = _count_drops(ds)
        # a map per block, not `filter`: that would bundle small blocks into one (see batch_size above)
        kept = ds.map_batches(_kept, batch_size=None, batch_format="pyarrow", num_cpus=0.25).materialize()
    finally:
        ctx.preserve_order = ordered  # what comes after (the reference pool) streams in any order
    _all_dropped(drops, len(pairs), cfg, where)
    return kept, drops


def _count_drops(ds) -> dict[str, int]:
    """{drop reason: pairs}, counted per block in Ray: the driver gets a few numbers per block, not the pairs."""
    counts = ds.map_batches(_block_drops, batch_size=None, batch_format="pyarrow", num_cpus=0.25).take_all()
    drops: dict[str, int] = {}
    for r in counts:
        drops[r[S.DROP_REASON]] = drops.get(r[S.DROP_REASON], 0) + r["n"]
    return drops


def _kept(batch):
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch[S.DROP_REASON], "")).drop_columns([S.DROP_REASON, S.SHUFFLE_KEY])


def _block_drops(batch):
    import pyarrow as pa

    reasons = [r for r in batch.column(S.DROP_REASON).to_pylist() if r]
    names = sorted(set(reasons))
    return pa.table({S.DROP_REASON: pa.array(names, pa.string()),
                     "n": pa.array([reasons.count(n) for n in names], pa.int64())})


def _all_dropped(drops: dict[str, int], num_pairs: int, cfg: DPOStageConfig, where: str) -> None:
    if sum(drops.values()) < num_pairs:
        return
    if set(drops) == {DROP_IDENTICAL}:
        raise UserError(f"{where}: all {num_pairs} pairs have chosen identical to rejected once tokenised; "
                        f"check how the pairs were made (chosen must be the preferred, different answer)")
    if set(drops) == {DROP_EMPTY}:
        raise UserError(f"{where}: all {num_pairs} pairs have an empty chosen or rejected response; "
                        f"check the pairs (stage 2's filters.min_words drops empty candidates)")
    raise UserError(f"{where}: all {num_pairs} pairs do not fit context_length={cfg.context_length} "
                    f"({drops}); raise context_length / max_prompt_length or set truncation: "
                    f"truncate_response")


def _tokenize_batch(batch, tokenizer_path, max_length, max_prompt_length, truncation, seed):
    tok = load_tokenizer(tokenizer_path)
    out = tokenize_pairs_batch(batch, tok, max_length, max_prompt_length, truncation,
                               columns=(S.PROMPT, S.CHOSEN, S.REJECTED))
    for col in (S.PROMPT, S.CHOSEN, S.REJECTED):  # from here on, token ids are the data
        out.pop(col)
    out[S.SHUFFLE_KEY] = np.array([shuffle_key(seed, str(p)) for p in out[S.PAIR_ID]], dtype=np.int64)
    return out


def _model_identity(path: str) -> str:
    """Cheap identity of a model folder (names, sizes, mtimes): hashing 14 GB of weights per run would not be."""
    p = Path(path)
    if not p.is_dir():
        return path  # a hub id
    items = sorted((str(f.relative_to(p)), f.stat().st_size, int(f.stat().st_mtime)) for f in p.rglob("*")
                   if f.is_file())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ReferenceCache:
    """Where the reference log-probs of one (reference model, data, tokenisation) live. `hit`: the file exists and
    will be used instead of the reference pool. Until it exists they build up in a common.reference.ReferenceStore
    (`store_dir`), which survives a crash."""

    fingerprint: str
    path: Path
    hit: bool

    def store_dir(self, work: Path) -> Path:
        """In the stage's work folder (on the shared output_dir; --force clears it, a finished run removes it)."""
        return work / "reference_logps" / self.fingerprint


def reference_cache(cfg: DPOStageConfig, ref_path: str, source: dict, upstream: dict | None) -> ReferenceCache:
    """The cache for this run's reference log-probs, and whether it exists. Beside the pairs for stage-2 input (a
    rerun of stage 2 replaces both), under output_dir for `train_path`."""
    ptc = cfg.preference_tuning_config
    key = json.dumps({
        "model": _model_identity(ref_path), "data": source["fingerprint"], "dtype": cfg.dtype,
        "backend": ptc.reference_backend, "context_length": cfg.context_length,
        "max_prompt_length": cfg.max_prompt_length, "truncation": cfg.truncation,
        "tokenization": TOKENIZATION_VERSION,
    }, sort_keys=True)
    fp = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(upstream["dir"]) if upstream else resolve(cfg.output_dir)
    path = root / "ref_logps" / f"{fp}.parquet"
    return ReferenceCache(fingerprint=fp, path=path, hit=path.exists())


def with_cached_logps(tokenized, cache: ReferenceCache):
    """The tokenised pairs joined with the cached reference log-probs by pair id, or None if the cache misses any
    pair. A keyed map, not Dataset.join: each block reads the cache's three narrow columns for its own pair ids, so
    neither the driver nor a shuffle (which needs free CPUs the trainers may hold) ever sees the tokens."""
    joined = tokenized.map_batches(_join_cached, batch_size=None, batch_format="pyarrow", num_cpus=0.25,
                                   fn_kwargs={"path": str(cache.path)}).materialize()
    return joined if joined.count() == tokenized.count() else None


def _join_cached(batch, path: str):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ids = batch[S.PAIR_ID]
    ref = pq.read_table(path, columns=[S.PAIR_ID, S.REF_CHOSEN_LOGPS, S.REF_REJECTED_LOGPS],
                        filters=pc.field(S.PAIR_ID).isin(ids.unique()))
    at = pc.index_in(ids, value_set=ref[S.PAIR_ID])  # each pair's row in the cache; null where it has none
    found = pc.is_valid(at)
    batch, at = batch.filter(found), at.filter(found)
    for name in (S.REF_CHOSEN_LOGPS, S.REF_REJECTED_LOGPS):
        batch = batch.append_column(name, ref[name].take(at))
    # from the cache: no process computed them in this run
    return batch.append_column(S.REF_PID, pa.array([-1] * batch.num_rows, pa.int64()))


def write_reference_cache(cache: ReferenceCache, store, num_pairs: int) -> bool:
    """Assemble the store's parts (every run's, each pair once) into the cache file, only if they cover every
    trained pair, in a Ray task (common.ray_setup.off_driver). Whether the cache was written."""
    return off_driver(_cache_from_store, cache, store, num_pairs)


def _cache_from_store(cache: ReferenceCache, store, num_pairs: int) -> bool:
    df = store.read()[[S.PAIR_ID, S.REF_CHOSEN_LOGPS, S.REF_REJECTED_LOGPS]]
    if len(df) != num_pairs:
        return False
    _write_cache(cache, df)
    return True


def _cache_from_blocks(cache: ReferenceCache, blocks: list) -> None:
    import ray

    _write_cache(cache, pd.concat([b.to_pandas() for b in ray.get(blocks)], ignore_index=True))


def _write_cache(cache: ReferenceCache, df: pd.DataFrame) -> None:
    """Atomically: a crash mid-write never leaves a cache file that a rerun would take as complete."""
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.path.with_suffix(".tmp")
    df.to_parquet(tmp)
    os.replace(tmp, cache.path)


def valid_with_reference(tokenized, cfg: DPOStageConfig, ref_path: str, cache: ReferenceCache,
                         provenance_dir: str):
    """The held-out pairs with their reference log-probs, materialised before training: from the cache, else one
    pass through a reference actor pool like the training pairs' (the same actor class, model and resources),
    cached the same way. Returns (dataset, "hit" | "computed")."""
    from common.reference import add_reference_logps

    ds = with_cached_logps(tokenized, cache) if cache.hit else None  # materialised
    if ds is not None:
        return ds, "hit"
    ds = add_reference_logps(tokenized, cfg, ref_path, provenance_dir=provenance_dir).materialize()
    off_driver(_cache_from_blocks, cache, ds.select_columns([S.PAIR_ID, S.REF_CHOSEN_LOGPS, S.REF_REJECTED_LOGPS])
               .to_arrow_refs())  # the blocks go from the object store to the task, never to the driver
    return ds, "computed"


@dataclass(frozen=True)
class TrainResult:
    """What one TorchTrainer run left behind: the final checkpoint (`model/`, `adapter/`), the rank-0 metrics log
    (already averaged over workers) and the stats the manifest records."""

    final_dir: Path
    metrics_file: Path
    num_pairs: int
    stats: dict


def _provenance(folder: Path) -> list[dict]:
    """The JSON each worker process left in `folder` (common.reference.record_provenance)."""
    return [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))]


def read_train_result(work: Path, final_dir: Path, num_pairs: int, logging_steps: int) -> TrainResult:
    """Summarise a finished run from its metrics log and the reference actors' provenance files in `work`."""
    metrics_file = work / "metrics.jsonl"
    rows = [json.loads(line) for line in open(metrics_file)] if metrics_file.exists() else []
    metrics = [m for m in rows if "eval/loss" not in m]  # training steps; evaluations (common.validation) apart
    evals = [m for m in rows if "eval/loss" in m]
    trainers = _provenance(work / "trainers")
    stats = {
        "steps": metrics[-1]["step"] if metrics else 0,
        "final_metrics": metrics[-1] if metrics else {},
        "first_metrics": metrics[0] if metrics else {},
        "step0_max_abs_logp_diff": next((m["step0_max_abs_logp_diff"] for m in metrics
                                         if "step0_max_abs_logp_diff" in m), None),
        "ref_wait_seconds": sum(m.get("ref_wait_seconds", 0.0) for m in metrics),
        "train_seconds": sum(m.get("step_seconds", 0.0) * logging_steps for m in metrics),
        # where the reference ran: one entry per actor process (a restarted actor adds one)
        "reference_actors": _provenance(work / "reference_actors"),
        "trainer_pids": sorted(t["pid"] for t in trainers),  # every rank's process (a restarted one adds one)
        "trainers": trainers,
        "trainer_node_ids": sorted({t["node_id"] for t in trainers}),
        "evaluations": len(evals),
        "first_eval": evals[0] if evals else {},
        "final_eval": evals[-1] if evals else {},
    }
    return TrainResult(final_dir=final_dir, metrics_file=metrics_file, num_pairs=num_pairs, stats=stats)
