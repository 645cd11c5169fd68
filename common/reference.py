"""The decoupled reference model: a Ray Data `map_batches` actor pool that adds reference log-probs to each pair.

LLMForge's `logprob_processor_scaling_config` keeps its meaning: `custom_resources` (e.g. accelerator_type:A10G)
place each actor, `concurrency` is the pool size, `batch_size` the pairs per call. The pool's output streams into
the trainers through `ray.train.get_dataset_shard`, so the reference forward of later blocks overlaps the policy
update of earlier ones, and no trainer process ever holds the reference model.

Two backends score the same tokens (the ids come from common.tokenize, upstream of this actor):
- `transformers` (default): `common.dpo_loss.model_logps`, the trainer's own function: one unpadded forward per
  sequence (prompt+chosen, prompt+rejected), so `batch_size` never changes a log-prob and at step 0 the policy
  (initialised from this model) reproduces them exactly.
- `vllm`: vLLM's `prompt_logprobs` over the same ids, with tensor parallelism for a reference larger than one GPU.

Restarts do not redo the reference: every actor writes each batch it scores to a `ReferenceStore` (small parquet
parts, keyed by pair id, in the stage's work folder on the shared output_dir) before handing the batch on, so every
pair a trainer has seen has stored log-probs. A rerun after a crash reads the stored pairs from there and sends only
the rest through the pool (`reference_logps_resumable`); an actor started by a Ray Train restart looks its batch up
in the store before scoring it.
"""
from __future__ import annotations

import functools
import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from common import schema as S
from common.ray_setup import off_driver

STORE_COLUMNS = [S.PAIR_ID, S.REF_CHOSEN_LOGPS, S.REF_REJECTED_LOGPS, S.REF_CHOSEN_TOKENS, S.REF_REJECTED_TOKENS]


class ReferenceStore:
    """The reference log-probs of one fingerprint (common.dpo.reference_cache), persisted as they are computed: one
    parquet part per scored batch, written under a temporary name and renamed, so a reader never sees half a part.
    Parts may overlap (a batch retried after its actor died mid-way): the first copy of a pair wins. `tag` names
    the parts one run writes, so the run can count what it computed."""

    def __init__(self, folder: str | Path, tag: str = "run"):
        self.folder, self.tag = Path(folder), tag

    def write(self, df: pd.DataFrame) -> None:
        if not len(df):
            return
        self._put(df[STORE_COLUMNS], self.tag)

    def _put(self, df: pd.DataFrame, tag: str) -> Path:
        """One new part, under a temporary name until complete."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = self.folder / f"part-{tag}-{uuid.uuid4().hex}.parquet"
        tmp = self.folder / f".{name.name}.tmp"
        df.to_parquet(tmp, index=False)
        os.replace(tmp, name)
        return name

    def parts(self, tag: str | None = None) -> list[Path]:
        return sorted(self.folder.glob(f"part-{tag + '-' if tag else ''}*.parquet"))

    def read(self, parts: list[Path] | None = None) -> pd.DataFrame:
        """Every stored pair once, in STORE_COLUMNS."""
        frames = [pd.read_parquet(p) for p in (self.parts() if parts is None else parts)]
        if not frames:
            return pd.DataFrame({c: pd.Series(dtype=object if c == S.PAIR_ID else float) for c in STORE_COLUMNS})
        df = pd.concat(frames, ignore_index=True)
        df[S.PAIR_ID] = df[S.PAIR_ID].astype(str)
        return df.drop_duplicates(S.PAIR_ID, keep="first").reset_index(drop=True)

    def compact(self) -> Path | None:
        """Merge every part into one (read once per task downstream, not one file per batch); None if empty."""
        parts = self.parts()
        if len(parts) <= 1:
            return parts[0] if parts else None
        name = self._put(self.read(parts), "compact")
        for p in parts:  # a crash before this ends leaves duplicates, which read() drops
            p.unlink(missing_ok=True)
        return name

    def rows_written(self, tag: str) -> int:
        """Rows this tag's parts hold (a retried batch counts twice: it was scored twice)."""
        import pyarrow.parquet as pq

        return sum(pq.read_metadata(p).num_rows for p in self.parts(tag))


def record_provenance(folder: str | None, **extra) -> None:
    """One small JSON per Ray worker process (reference actor or trainer): its pid, Ray node and the Ray resources
    it was given, so stage 3's manifest shows where each ran."""
    if not folder:
        return
    import json

    import ray

    Path(folder).mkdir(parents=True, exist_ok=True)
    ctx = ray.get_runtime_context()
    info = {"pid": os.getpid(), "node_id": ctx.get_node_id(), "resources": ctx.get_assigned_resources(), **extra}
    (Path(folder) / f"{os.getpid()}.json").write_text(json.dumps(info))


def _out(batch, chosen, rejected, n_chosen, n_rejected, pid: int | None = None):
    batch[S.REF_CHOSEN_LOGPS] = np.asarray(chosen, dtype=np.float64)
    batch[S.REF_REJECTED_LOGPS] = np.asarray(rejected, dtype=np.float64)
    batch[S.REF_CHOSEN_TOKENS] = np.asarray(n_chosen, dtype=np.int64)
    batch[S.REF_REJECTED_TOKENS] = np.asarray(n_rejected, dtype=np.int64)
    batch[S.REF_PID] = np.full(len(batch[S.PAIR_ID]), os.getpid() if pid is None else pid, dtype=np.int64)
    return batch


def _subset(batch: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[keep] for k, v in batch.items()}


class _Scorer:
    """What both backends share: a batch's pairs already in the store are looked up, the others scored by
    `_score` and written to the store before the batch moves on."""

    def _open_store(self, store_dir: str | None, store_tag: str) -> None:
        self.store = ReferenceStore(store_dir, store_tag) if store_dir else None
        # Parts written before this actor started (a Ray Train restart within the same run): looked up, not scored.
        self.stored = self.store.read().set_index(S.PAIR_ID) if self.store else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray([str(i) for i in batch[S.PAIR_ID]], dtype=object)
        known = ids_in(ids, self.stored)
        cols = {k: np.zeros(len(ids), dtype=t) for k, t in zip(STORE_COLUMNS[1:], (np.float64, np.float64, np.int64,
                                                                                  np.int64))}
        if known.any():
            hit = self.stored.loc[ids[known]]
            for k in cols:
                cols[k][known] = hit[k].to_numpy()
        todo = ~known
        if todo.any():
            scored = self._score(_subset(batch, todo))
            for k, v in zip(STORE_COLUMNS[1:], scored):
                cols[k][todo] = v
            if self.store is not None:
                self.store.write(pd.DataFrame({S.PAIR_ID: ids[todo], **{k: v[todo] for k, v in cols.items()}}))
        return _out(batch, *cols.values())


def ids_in(ids: np.ndarray, table: pd.DataFrame | None) -> np.ndarray:
    """Which of `ids` have a row in `table` (indexed by pair id)."""
    if table is None or not len(table):
        return np.zeros(len(ids), dtype=bool)
    return np.isin(ids, table.index.to_numpy())


class ReferenceLogProbProcessor(_Scorer):
    """Loads the frozen reference once per actor; `__call__` returns the batch plus TRL's `ref_chosen_logps` /
    `ref_rejected_logps` (summed over response tokens)."""

    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 provenance_dir: str | None = None, attn_implementation: str | None = None,
                 store_dir: str | None = None, store_tag: str = "run"):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation).eval()
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.pad_id = self.model.config.pad_token_id or 0
        from common.dpo_loss import supports_logits_to_keep

        self.window = supports_logits_to_keep(self.model)
        self._open_store(store_dir, store_tag)
        record_provenance(provenance_dir)

    def _score(self, batch: dict[str, np.ndarray]) -> tuple:
        from common.dpo_loss import model_logps
        from common.tokenize import collate_pairs

        ids, attn, mask = collate_pairs(batch[S.PROMPT_IDS], batch[S.CHOSEN_IDS], batch[S.REJECTED_IDS], self.pad_id)
        dev = self.model.device
        with self.torch.inference_mode():
            logps, ntok, _ = model_logps(self.model, ids.to(dev), attn.to(dev), mask.to(dev), self.window)
        b = len(batch[S.PROMPT_IDS])
        logps, ntok = logps.float().cpu().numpy(), ntok.cpu().numpy()
        return logps[:b], logps[b:], ntok[:b], ntok[b:]


class VLLMReferenceLogProbProcessor(_Scorer):
    """The same numbers from vLLM's `prompt_logprobs`: the response tokens are scored as part of the prompt, so one
    prefill per sequence and no sampling. `tensor_parallel_size > 1` spreads a large reference over GPUs."""

    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1, max_model_len: int = 2048, provenance_dir: str | None = None,
                 store_dir: str | None = None, store_tag: str = "run"):
        from vllm import LLM, SamplingParams

        self._open_store(store_dir, store_tag)
        record_provenance(provenance_dir)
        on_cpu = not _has_cuda()
        if on_cpu:  # else vLLM claims 92% of the host's memory for its KV cache
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.llm = LLM(model_path, dtype=dtype, trust_remote_code=trust_remote_code, enforce_eager=on_cpu,
                       tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                       enable_prefix_caching=False,
                       # Inside a Ray actor vLLM would otherwise pick its Ray executor and ask Ray for a placement
                       # group this actor already holds the resources of: it would wait forever.
                       distributed_executor_backend="mp")
        # prompt_logprobs=0: the logprob of each actual prompt token, nothing else.
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)

    def _score(self, batch: dict[str, np.ndarray]) -> tuple:
        from vllm.inputs import TokensPrompt

        prompts, spans = [], []
        for p, c, r in zip(batch[S.PROMPT_IDS], batch[S.CHOSEN_IDS], batch[S.REJECTED_IDS]):
            for resp in (c, r):
                prompts.append(TokensPrompt(prompt_token_ids=[int(t) for t in (*p, *resp)]))
                spans.append((len(p), len(resp)))
        outs = self.llm.generate(prompts, self.params, use_tqdm=False)
        sums = []
        for out, (n_p, n_r) in zip(outs, spans):
            ids = out.prompt_token_ids
            lp = out.prompt_logprobs  # position i: {token_id: Logprob} for token i (None at position 0)
            sums.append(sum(lp[i][ids[i]].logprob for i in range(n_p, n_p + n_r)))
        sums = np.asarray(sums)
        n_c = [len(c) for c in batch[S.CHOSEN_IDS]]
        n_r = [len(r) for r in batch[S.REJECTED_IDS]]
        return sums[0::2], sums[1::2], n_c, n_r


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def reference_logps_resumable(ds, cfg, model_path: str, store: ReferenceStore, provenance_dir: str | None = None):
    """Attach the reference log-probs to `ds` (lazy). `cfg` is the stage-3 config. With a `store`, the pairs it holds
    already (a rerun after a crash) are read from it and only the others go through the actor pool, which adds
    what it scores to the store. Returns (dataset, pairs read from the store)."""
    stored = off_driver(store.compact)  # every part read by a task, not the driver
    reused, total = _count_stored(ds, stored)
    if not reused:
        return add_reference_logps(ds, cfg, model_path, provenance_dir, store), 0
    # batch_size=None: one batch per block, so the blocks stay as many as the trainers were given (common.dpo)
    known = ds.map_batches(_from_store, fn_kwargs={"path": str(stored)}, batch_format="numpy", batch_size=None,
                           num_cpus=0.25)
    if reused == total:  # every pair scored before: no reference actor at all
        return known, reused
    todo = ds.map_batches(_not_in_store, fn_kwargs={"path": str(stored)}, batch_format="numpy", batch_size=None,
                          num_cpus=0.25)
    return add_reference_logps(todo, cfg, model_path, provenance_dir, store).union(known), reused


@functools.lru_cache(maxsize=2)
def _stored_table(path: str) -> pd.DataFrame:
    """A compacted store part, indexed by pair id; read once per worker process (its name is unique)."""
    return pd.read_parquet(path).set_index(S.PAIR_ID)


def _count_stored(ds, stored: Path | None) -> tuple[int, int]:
    """(pairs of `ds` in the store, pairs of `ds`): counted per block by Ray's tasks, summed by Ray Data."""
    if stored is None:
        return 0, -1
    counts = ds.map_batches(_stored_count, fn_kwargs={"path": str(stored)}, batch_format="numpy", batch_size=None,
                            num_cpus=0.25).sum(["stored", "pairs"])
    return int(counts["sum(stored)"] or 0), int(counts["sum(pairs)"] or 0)


def _stored_count(batch: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    ids = np.asarray([str(i) for i in batch[S.PAIR_ID]], dtype=object)
    return {"stored": np.array([ids_in(ids, _stored_table(path)).sum()]), "pairs": np.array([len(ids)])}


def _from_store(batch: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    """The batch's pairs that have stored reference log-probs, with them (`ref_pid` -1: no process of this run)."""
    table = _stored_table(path)
    ids = np.asarray([str(i) for i in batch[S.PAIR_ID]], dtype=object)
    keep = ids_in(ids, table)
    hit = table.loc[ids[keep]]
    return _out(_subset(batch, keep), *(hit[k].to_numpy() for k in STORE_COLUMNS[1:]), pid=-1)


def _not_in_store(batch: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    ids = np.asarray([str(i) for i in batch[S.PAIR_ID]], dtype=object)
    return _subset(batch, ~ids_in(ids, _stored_table(path)))


def add_reference_logps(ds, cfg, model_path: str, provenance_dir: str | None = None,
                        store: ReferenceStore | None = None):
    """Attach the reference actor pool to `ds` (lazy). `cfg` is the stage-3 config; with a `store`, the actors add
    what they score to it."""
    import ray

    sc = cfg.preference_tuning_config.logprob_processor_scaling_config
    ptc = cfg.preference_tuning_config
    lo, hi = (sc.concurrency, sc.concurrency) if isinstance(sc.concurrency, int) else sc.concurrency
    kwargs = dict(model_path=model_path, dtype=cfg.dtype, provenance_dir=provenance_dir,
                  attn_implementation=cfg.attn_implementation,
                  store_dir=str(store.folder) if store else None, store_tag=store.tag if store else "run")
    cls = ReferenceLogProbProcessor
    if ptc.reference_backend == "vllm":
        cls = VLLMReferenceLogProbProcessor
        kwargs.pop("attn_implementation")  # vLLM picks its own attention kernels
        kwargs.update(tensor_parallel_size=ptc.reference_tensor_parallel_size, max_model_len=cfg.context_length + 1)
    return ds.map_batches(
        cls,
        fn_constructor_kwargs=kwargs,
        batch_size=sc.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        num_cpus=sc.num_cpus,
        num_gpus=sc.num_gpus or None,
        resources=dict(sc.custom_resources) or None,
        # A killed actor is restarted and its in-flight batches retried: every pair is still seen once.
        max_restarts=-1,
        max_task_retries=-1,
    )
