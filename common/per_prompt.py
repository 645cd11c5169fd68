"""Stage 2's per-prompt steps as Ray Data transforms: the candidates stream from stage 1's files to stage 2's, and
the driver holds counts, never rows.

    marked = mark_filters(candidates, cfg.filters)        # + FILTER_REASON, PAIRABLE (groupby prompt)
    totals = filter_totals(marked)                        # {reason: count}, and whether any prompt can be paired
    per_prompt = pair_prompts(scored, cfg.pairing, seed)  # one row per prompt: its pairs, counts, holdout rank
    stats = pair_totals(per_prompt)                       # the manifest's pairing stats, from Ray Data aggregates
    cutoff = holdout_cutoff(per_prompt, fraction)         # prompts at or below it are held out for validation
    pairs = explode(per_prompt, cutoff, held=False)       # TRL rows, one per pair
    all_candidates(marked, scored)                        # candidates.parquet: every candidate, scored or why not

A prompt's candidates meet in `groupby(PROMPT_ID).map_groups(...)`: duplicates and pairs are decided within a
prompt, so no step needs the whole dataset. On 2 cores the groupbys run while no actor holds a CPU (the judge's
actors start after the first and are gone before the second, because the caller materialises around the judge):
a shuffle's reduce tasks want a CPU each, and on a cluster the same order keeps the judge's GPUs busy instead of
waiting on a shuffle.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from common import schema as S
from common.config import FilterConfig, PairingConfig
from common.filters import filter_reasons
from common.judges.base import num_words
from common.judges import parse_details
from common.pairing import (LENGTH, PAIR_SCHEMA, QUALITY, SKIPS, holdout_count, holdout_rank, pair_stats, pairable,
                            pairs_for_prompt, prompt_totals, trl_row)

TASK_CPUS = 0.25  # every task here is light: a fraction leaves room beside the judge's actors on 2 cores


def by_prompt(ds, fn, num_blocks: int, **kwargs):
    return ds.groupby(S.PROMPT_ID, num_partitions=num_blocks).map_groups(
        fn, fn_kwargs=kwargs, batch_format="pyarrow", num_cpus=TASK_CPUS)


# ---------------------------------------------------------------- filters
def _mark(group: pa.Table, cfg: FilterConfig) -> pa.Table:
    group = group.sort_by(S.CANDIDATE)  # the first of two duplicates is kept: "first" is the lower index
    reasons = filter_reasons(group.select([S.PROMPT_ID, S.RESPONSE]).to_pandas(), cfg)
    kept = [t for t, r in zip(group.column(S.RESPONSE).to_pylist(), reasons) if not r]
    ok = pairable([""] * len(kept), kept)
    return (group.append_column(S.FILTER_REASON, pa.array(reasons, pa.string()))
            .append_column(S.PAIRABLE, pa.array([ok] * group.num_rows, pa.bool_())))


def mark_filters(candidates, cfg: FilterConfig, num_blocks: int):
    """Every candidate with FILTER_REASON ("" = kept) and PAIRABLE (its prompt has two different kept texts)."""
    return by_prompt(candidates, _mark, num_blocks, cfg=cfg)


def filter_totals(marked) -> tuple[dict[str, int], bool]:
    """({filter reason: candidates removed}, whether any prompt can still be paired): one small aggregate."""
    from ray.data.aggregate import Count, Max

    rows = marked.groupby(S.FILTER_REASON).aggregate(Count(), Max(S.PAIRABLE)).take_all()  # a row per reason
    removed = {r[S.FILTER_REASON]: int(r["count()"]) for r in rows if r[S.FILTER_REASON]}
    return dict(sorted(removed.items())), any(r[f"max({S.PAIRABLE})"] for r in rows)


# ---------------------------------------------------------------- pairs
def _pair(group: pa.Table, cfg: PairingConfig, seed: int) -> pa.Table:
    rows = group.sort_by(S.CANDIDATE).to_pylist()
    pid = rows[0][S.PROMPT_ID]
    kept, counts = pairs_for_prompt(rows, cfg, seed)
    pairs = [trl_row(pid, p) for p in kept]
    row = {S.PROMPT_ID: pid, S.PAIRS_JSON: json.dumps(pairs, ensure_ascii=False), **prompt_totals(pairs, counts),
           S.HOLDOUT_RANK: holdout_rank(seed, pid) if pairs else -1}
    return pa.Table.from_pylist([row])


def pair_prompts(scored, cfg: PairingConfig, seed: int, num_blocks: int):
    """One row per prompt: its pairs (JSON of TRL rows), their counts by rule, the pairing rule's skips and the
    prompt's rank for the validation holdout (-1 without pairs)."""
    return by_prompt(scored, _pair, num_blocks, cfg=cfg, seed=seed)


def pair_totals(per_prompt) -> dict:
    """The manifest's pairing stats (common.pairing.pair_stats), from one pass of Ray Data aggregates."""
    from ray.data.aggregate import Count, Max, Sum

    sums = ("pairs", QUALITY, LENGTH, "with_pairs", *SKIPS, "words_gap", "score_gap")
    agg = per_prompt.aggregate(Count(), Max("pairs"), *(Sum(c) for c in sums))
    return pair_stats({c: agg[f"sum({c})"] or 0 for c in sums}, int(agg["count()"]), int(agg["max(pairs)"] or 0))


def holdout_cutoff(per_prompt, fraction: float) -> int:
    """The highest holdout rank that is held out (-1: none), as common.pairing.holdout_count says how many.
    The driver reads one int64 per prompt with pairs (80 MB at 10M prompts), not the prompts."""
    from ray.data.expressions import col

    ranks = [b[S.HOLDOUT_RANK] for b in per_prompt.filter(expr=col(S.HOLDOUT_RANK) >= 0)
             .select_columns([S.HOLDOUT_RANK]).iter_batches(batch_format="numpy", batch_size=None)]
    ranks = np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
    k = holdout_count(len(ranks), fraction)
    return int(np.partition(ranks, k - 1)[k - 1]) if k else -1


def _explode(batch: pa.Table) -> pa.Table:
    rows = [p for text in batch.column(S.PAIRS_JSON).to_pylist() for p in json.loads(text)]
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)  # one schema for every block, an empty one included


def explode(per_prompt, cutoff: int, held: bool):
    """The pairs (TRL rows) of the held-out prompts (rank <= cutoff) or of the rest."""
    from ray.data.expressions import col

    rank = col(S.HOLDOUT_RANK)
    keep = ((rank >= 0) & (rank <= cutoff)) if held else (rank > cutoff) if cutoff >= 0 else (rank >= 0)
    return per_prompt.filter(expr=keep).map_batches(_explode, batch_format="pyarrow", num_cpus=TASK_CPUS)


# ---------------------------------------------------------------- what the driver reads back
def column(ds, name: str) -> np.ndarray:
    """One numeric column on the driver (8 bytes a row: the score histogram and its summary need every value)."""
    parts = [b[name] for b in ds.select_columns([name]).iter_batches(batch_format="numpy", batch_size=None)]
    return np.concatenate(parts) if parts else np.zeros(0)


def details(scored):
    """The judge's parsed JUDGE_DETAILs, streamed a batch at a time (for error counts and judge.summary)."""
    for b in scored.select_columns([S.JUDGE_DETAIL]).iter_batches(batch_format="pyarrow", batch_size=4096):
        yield from parse_details(b.column(S.JUDGE_DETAIL).to_pylist())


def _removed(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    words = [num_words(t) for t in batch.column(S.RESPONSE).to_pylist()]
    return (batch.append_column(S.SCORE, pa.array([float("nan")] * n, pa.float64()))
            .append_column(S.NUM_WORDS, pa.array(words, pa.int64()))
            .append_column(S.JUDGE_DETAIL, pa.nulls(n, pa.string())))


def _judged(batch: pa.Table) -> pa.Table:
    return batch.append_column(S.FILTER_REASON, pa.array([""] * batch.num_rows, pa.string()))


def all_candidates(marked, scored):
    """Every candidate for candidates.parquet: the judged ones with their score, the removed ones with why (and no
    score). PROMPT is left out: it repeats SOURCE inside the prompt template."""
    from ray.data.expressions import col

    removed = (marked.filter(expr=col(S.FILTER_REASON) != "").drop_columns([S.PAIRABLE, S.PROMPT])
               .map_batches(_removed, batch_format="pyarrow", num_cpus=TASK_CPUS))
    judged = scored.drop_columns([S.PROMPT]).map_batches(_judged, batch_format="pyarrow", num_cpus=TASK_CPUS)
    names = [c for c in scored.columns() if c != S.PROMPT] + [S.FILTER_REASON]
    return judged.union(removed).select_columns(names)
