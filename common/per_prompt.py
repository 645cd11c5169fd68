"""Stage 2's per-prompt steps as Ray Data transforms: the candidates stream from stage 1's files to stage 2's, and
the driver holds counts, never rows.

    members = with_prompts(candidates, prompts)           # the candidates and a row per prompt (its text, source)
    marked = mark_filters(members, cfg.filters, blocks, keep_prompts=prompts is None)  # + FILTER_REASON, ...
    totals = filter_totals(marked)                        # {reason: count}, whether any prompt can be paired, count
    per_prompt = pair_prompts(scored, prompt_rows(marked, prompts), cfg.pairing, seed)  # a row per prompt: its pairs
    stats = pair_totals(per_prompt)                       # the manifest's pairing stats, from Ray Data aggregates
    cutoff = holdout_cutoff(per_prompt, fraction)         # prompts at or below it are held out for validation
    pairs = explode(per_prompt, cutoff, held=False)       # TRL rows, one per pair
    all_candidates(marked, scored)                        # candidates.parquet: every candidate, scored or why not

`mark_filters` adds FILTER_REASON, PAIRABLE and the kept candidates' SOURCE. A prompt's candidates meet in
`groupby(PROMPT_ID).map_groups(...)`: duplicates and pairs are decided within a prompt, so no step needs the whole
dataset. On 2 cores the groupbys run while no actor holds a CPU (the judge's actors start after the first and are
gone before the second, because the caller materialises around the judge): a shuffle's reduce tasks want a CPU
each, and on a cluster the same order keeps the judge's GPUs busy instead of waiting on a shuffle.

A prompt's text and source are stored once (stage 1's prompts.parquet), not on each candidate. They reach the
candidates inside those same groupbys: one row per prompt (with no CANDIDATE) goes into the shuffle beside the
candidates, so a source crosses each shuffle once per prompt instead of n times, and nothing is joined on the driver
or read again per block (pairing reads the prompts file once more; only an older stage-1 output, without one, keeps
its prompt rows in `marked` for that). Only the judge's input carries a source per candidate (it scores against it).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common import schema as S
from common.config import FilterConfig, PairingConfig
from common.errors import UserError
from common.filters import filter_reasons
from common.generation import PROMPT_COLUMNS
from common.groups import TASK_CPUS, by_prompt, first_per_prompt, split_group, stacked, with_rows_of
from common.judges import parse_details
from common.judges.base import num_words
from common.pairing import (LENGTH, PAIR_SCHEMA, QUALITY, SKIPS, holdout_count, holdout_rank, pair_stats, pairable,
                            pairs_for_prompt, prompt_totals, trl_row)

# ---------------------------------------------------------------- a prompt's own columns
PROMPTS_FILE = "prompts.parquet"  # in stage 1's output, beside data/
NO_PROMPT = "no_prompt"  # FILTER_REASON of a candidate whose prompt row is missing: it has no source to judge by


def stage1_prompts(manifest: dict) -> Path | None:
    """Stage 1's prompts file (from its manifest), or None for an output written before stage 1 kept one."""
    if PROMPTS_FILE not in manifest.get("files", ()):
        return None
    path = Path(manifest["dir"]) / PROMPTS_FILE
    if not path.is_dir() or not any(path.glob("*.parquet")):
        raise UserError(f"{path}: missing or empty, but {manifest['dir']}/manifest.json lists it; rerun 01_generate "
                        f"with --force")
    return path


def _split_inline(batch: pa.Table) -> pa.Table:
    """A batch of candidates that carry their prompt's columns -> the candidates without them, and a prompt row for
    each prompt in the batch (the groupby keeps one)."""
    return stacked(batch.drop_columns(list(PROMPT_COLUMNS)),
                   first_per_prompt(batch.select([S.PROMPT_ID, *PROMPT_COLUMNS])))


def with_prompts(candidates, prompts=None):
    """Stage 1's candidates and one row per prompt (PROMPT_COLUMNS, and CANDIDATE null), as one dataset for
    mark_filters. `prompts`: stage 1's prompts.parquet; None for a stage-1 output from before it, whose
    candidates carry their prompt's columns (then each batch gives the prompt rows of the prompts it holds)."""
    if prompts is None:
        return candidates.map_batches(_split_inline, batch_format="pyarrow", num_cpus=TASK_CPUS)
    return with_rows_of(candidates, prompts)


def prompt_rows(marked, prompts=None):
    """The prompts' rows for pair_prompts: stage 1's prompts file, read again (on 2 cores, 2x faster than scanning
    `marked`, whose kept candidates carry their source), or for an older stage-1 output the rows mark_filters kept
    (keep_prompts=True)."""
    from ray.data.expressions import col

    if prompts is not None:
        return prompts
    return marked.filter(expr=col(S.CANDIDATE).is_null()).select_columns([S.PROMPT_ID, *PROMPT_COLUMNS])


def _split(group: pa.Table) -> tuple[pa.Table, pa.Table]:
    """A group of the per-prompt groupby -> (its prompt row: one row, or none; its candidates, by index)."""
    prompt, cands = split_group(group, pc.is_null(group.column(S.CANDIDATE)))
    return prompt, cands.sort_by(S.CANDIDATE)


# ---------------------------------------------------------------- filters
def _mark(group: pa.Table, cfg: FilterConfig, keep_prompts: bool) -> pa.Table:
    prompt, cands = _split(group)  # the first of two duplicates is kept: "first" is the lower index
    reasons = filter_reasons(cands.select([S.PROMPT_ID, S.RESPONSE]).to_pandas(), cfg)
    if not prompt.num_rows:
        reasons = [r or NO_PROMPT for r in reasons]
    kept = [t for t, r in zip(cands.column(S.RESPONSE).to_pylist(), reasons) if not r]
    ok = pairable([""] * len(kept), kept)
    # Only the candidates the judge will score get the source; a kept prompt row keeps every prompt column.
    source = prompt.column(S.SOURCE).to_pylist()  # [] without a prompt row: then every reason is set
    cands = cands.set_column(cands.column_names.index(S.SOURCE), S.SOURCE,
                             pa.array([None if r else source[0] for r in reasons], cands.schema.field(S.SOURCE).type))
    rows = pa.concat_tables([prompt, cands]) if keep_prompts else cands
    reasons = [""] * (rows.num_rows - cands.num_rows) + reasons
    return (rows.append_column(S.FILTER_REASON, pa.array(reasons, pa.string()))
            .append_column(S.PAIRABLE, pa.array([ok] * rows.num_rows, pa.bool_())))


def mark_filters(members, cfg: FilterConfig, num_blocks: int, keep_prompts: bool):
    """Every candidate with FILTER_REASON ("" = kept) and PAIRABLE (its prompt has two different kept texts), the
    kept ones with their prompt's SOURCE; with `keep_prompts`, each prompt's row (with_prompts) too, once: pairing
    reads it back (prompt_rows) when stage 1 wrote no prompts file to read again."""
    return by_prompt(members, _mark, num_blocks, cfg=cfg, keep_prompts=keep_prompts)


def filter_totals(marked) -> tuple[dict[str, int], bool, int]:
    """({filter reason: candidates removed}, whether any prompt can still be paired, the number of candidates): one
    small aggregate."""
    from ray.data.aggregate import Count, Max
    from ray.data.expressions import col

    rows = (marked.filter(expr=col(S.CANDIDATE).is_not_null()).groupby(S.FILTER_REASON)
            .aggregate(Count(), Max(S.PAIRABLE)).take_all())  # a row per reason
    removed = {r[S.FILTER_REASON]: int(r["count()"]) for r in rows if r[S.FILTER_REASON]}
    return (dict(sorted(removed.items())), any(r[f"max({S.PAIRABLE})"] for r in rows),
            sum(int(r["count()"]) for r in rows))


def to_judge(marked):
    """The candidates no filter removed, with their prompt's SOURCE: the judge's input."""
    from ray.data.expressions import col

    keep = (col(S.FILTER_REASON) == "") & col(S.CANDIDATE).is_not_null()
    return marked.filter(expr=keep).drop_columns([S.FILTER_REASON, S.PAIRABLE, S.PROMPT, S.REFERENCE])


# ---------------------------------------------------------------- pairs
def _pair(group: pa.Table, cfg: PairingConfig, seed: int) -> pa.Table:
    prompt, cands = _split(group)  # mark_filters sends a candidate to the judge only if its prompt row is there
    own = prompt.select([S.PROMPT, S.SOURCE]).to_pylist()
    rows = [dict(r, **own[0]) for r in cands.to_pylist()]
    pid = group.column(S.PROMPT_ID)[0].as_py()
    kept, counts = pairs_for_prompt(rows, cfg, seed)
    pairs = [trl_row(pid, p) for p in kept]
    row = {S.PROMPT_ID: pid, S.PAIRS_JSON: json.dumps(pairs, ensure_ascii=False), **prompt_totals(pairs, counts),
           S.HOLDOUT_RANK: holdout_rank(seed, pid) if pairs else -1}
    out = pa.Table.from_pylist([row])
    return out if rows else out.slice(0, 0)  # a prompt none of whose candidates was judged is not counted


def pair_prompts(scored, prompts, cfg: PairingConfig, seed: int, num_blocks: int):
    """One row per judged prompt: its pairs (JSON of TRL rows, with the PROMPT and SOURCE of its row in `prompts`),
    their counts by rule, the pairing rule's skips and the prompt's rank for the validation holdout (-1 without
    pairs)."""
    return by_prompt(with_rows_of(scored, prompts), _pair, num_blocks, cfg=cfg, seed=seed)


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
    score). The prompt's columns are left out: they are stage 1's prompts.parquet, once per prompt."""
    from ray.data.expressions import col

    removed = (marked.filter(expr=(col(S.FILTER_REASON) != "") & col(S.CANDIDATE).is_not_null())
               .drop_columns([S.PAIRABLE, *PROMPT_COLUMNS])
               .map_batches(_removed, batch_format="pyarrow", num_cpus=TASK_CPUS))
    judged = scored.map_batches(_judged, batch_format="pyarrow", num_cpus=TASK_CPUS)
    names = [c for c in scored.columns() if c not in PROMPT_COLUMNS] + [S.FILTER_REASON]
    return judged.union(removed).select_columns(names)
