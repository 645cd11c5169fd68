"""A prompt's rows together, on Ray Data: the one grouping primitive of stages 2 and 4 and of the LLM judges.

    by_prompt(ds, fn, num_blocks)        # fn(one prompt's rows as a pyarrow Table) -> rows, in Ray's tasks
    with_rows_of(ds, other)              # ds's rows and other's in one dataset (the columns of both), to group
    own, rest = split_group(group, is_own)   # in fn: that once-per-prompt row (or none) and the prompt's other rows
    first_per_prompt(batch)              # a prompt's first row in a batch (a combiner before a groupby)

Per-prompt work (duplicates, pairs, head-to-head matches, a judge's per-source questions) runs in
`groupby(PROMPT_ID).map_groups(...)`, so no step collects the dataset. Something a prompt has once (its source, the
questions written from it) joins its n rows by going into the same groupby as one more row, so it crosses the
shuffle once, not n times. Callers run a groupby while no actor holds a CPU (they materialise around actor stages):
a shuffle's reduce tasks want a CPU each; on 2 cores that would deadlock, on a cluster the GPUs never wait on it.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from common import schema as S

TASK_CPUS = 0.25  # every task here is light: a fraction leaves room beside the actors on 2 cores


def by_prompt(ds, fn, num_blocks: int, **kwargs):
    return ds.groupby(S.PROMPT_ID, num_partitions=num_blocks).map_groups(
        fn, fn_kwargs=kwargs, batch_format="pyarrow", num_cpus=TASK_CPUS)


def first_per_prompt(batch: pa.Table) -> pa.Table:
    """The first row of each prompt in `batch`, in order of first appearance."""
    first: dict[str, int] = {}
    for i, pid in enumerate(batch.column(S.PROMPT_ID).to_pylist()):
        first.setdefault(pid, i)
    return batch.take(pa.array(list(first.values()), pa.int64()))


def padded(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """`batch` with `schema`'s columns, in its order; the ones it lacks are nulls (rows of a union have one schema)."""
    have = set(batch.column_names)
    return pa.Table.from_arrays([batch.column(f.name).cast(f.type) if f.name in have
                                 else pa.nulls(batch.num_rows, f.type) for f in schema], schema=schema)


def _union(schemas: list[pa.Schema]) -> pa.Schema:
    return pa.unify_schemas(schemas, promote_options="permissive")


def stacked(first: pa.Table, second: pa.Table) -> pa.Table:
    """One table of both tables' rows, padded to the union of their columns (with_rows_of within a batch)."""
    schema = _union([first.schema, second.schema])
    return pa.concat_tables([padded(first, schema), padded(second, schema)])


def with_rows_of(ds, other):
    """One dataset of `ds`'s rows and `other`'s, both padded to the union of their columns (for by_prompt)."""
    schema = _union([ds.schema().base_schema, other.schema().base_schema])  # Arrow blocks: every caller makes them
    pad = dict(batch_format="pyarrow", num_cpus=TASK_CPUS, fn_kwargs={"schema": schema})
    return ds.map_batches(padded, **pad).union(other.map_batches(padded, **pad))


def split_group(group: pa.Table, is_own: pa.Array) -> tuple[pa.Table, pa.Table]:
    """A group of by_prompt(with_rows_of(rows, once_per_prompt), ...) -> (the prompt's own row from
    `once_per_prompt`: one row, or none when it had none; the prompt's other rows). `is_own` marks that row
    (a mask without nulls: pc.is_valid or pc.is_null of a column only one side has)."""
    return group.filter(is_own).slice(0, 1), group.filter(pc.invert(is_own))
