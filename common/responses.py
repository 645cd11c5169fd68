"""Stage 4's table of responses to judge, built on Ray Data: the driver holds no prompt and no response.

    answers = from_outputs(prompts, name, answers)      # another system's outputs file, as rows
    answers = as_responses(generate(...), name)         # a model's generations, as rows
    table = answered_by_all(union(*answers, human_references(prompts)), names, blocks)

Every source above has the same columns (RESPONSE_SCHEMA), one row per (prompt, model). A prompt's rows meet in
`groupby(PROMPT_ID).map_groups(...)`, which keeps only the prompts every model answered (a prompt too long for one
model's context is left out for all: like with like) and puts its rows side by side, so the judge embeds the prompt's
source once. The caller materialises each model's generations and the grouped table, so no vLLM or judge actor holds
a CPU while the shuffle's tasks want one (on 2 cores that would deadlock; on a cluster the GPUs never wait on it).
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from common import schema as S
from common.groups import TASK_CPUS, by_prompt
from common.report import REFERENCE_SYSTEM  # the human references, judged as one more "model"

RESPONSE_SCHEMA = pa.schema([(S.PROMPT_ID, pa.string()), (S.SOURCE, pa.string()), (S.REFERENCE, pa.string()),
                             (S.SYSTEM, pa.string()), (S.RESPONSE, pa.string()),
                             (S.NUM_RESPONSE_TOKENS, pa.int64()), (S.FINISH_REASON, pa.string())])


def _rows(batch: pa.Table, system: str, response: list[str], tokens=None, finish=None) -> pa.Table:
    n = batch.num_rows
    return pa.Table.from_arrays([
        batch.column(S.PROMPT_ID).cast(pa.string()), batch.column(S.SOURCE).cast(pa.string()),
        batch.column(S.REFERENCE).cast(pa.string()), pa.array([system] * n, pa.string()),
        pa.array(response, pa.string()),
        pa.array([-1] * n, pa.int64()) if tokens is None else tokens.cast(pa.int64()),
        pa.array([""] * n, pa.string()) if finish is None else finish.cast(pa.string())], schema=RESPONSE_SCHEMA)


def _generated(batch: pa.Table, system: str) -> pa.Table:
    return _rows(batch, system, batch.column(S.RESPONSE).to_pylist(), batch.column(S.NUM_RESPONSE_TOKENS),
                 batch.column(S.FINISH_REASON))


def as_responses(generated, system: str):
    """A model's generations (common.generation's rows) as response rows."""
    return generated.map_batches(_generated, batch_format="pyarrow", num_cpus=TASK_CPUS, fn_kwargs={"system": system})


def _answered(batch: pa.Table, system: str, answers: dict[str, str]) -> pa.Table:
    return _rows(batch, system, [answers[p] for p in batch.column(S.PROMPT_ID).to_pylist()])


def from_outputs(prompts, system: str, answers: dict[str, str]):
    """Another system's answers ({prompt id: response}, read and checked by the stage) as response rows."""
    return prompts.map_batches(_answered, batch_format="pyarrow", num_cpus=TASK_CPUS,
                               fn_kwargs={"system": system, "answers": answers})


def _references(batch: pa.Table) -> pa.Table:
    refs = [str(r or "") for r in batch.column(S.REFERENCE).to_pylist()]
    keep = pa.array([bool(r.strip()) for r in refs])
    return _rows(batch, REFERENCE_SYSTEM, refs).filter(keep)


def human_references(prompts):
    """The prompts' human references (where the data has one) as the responses of REFERENCE_SYSTEM."""
    return prompts.map_batches(_references, batch_format="pyarrow", num_cpus=TASK_CPUS)


def _keep_if_all(group: pa.Table, systems: list[str]) -> pa.Table:
    have = set(group.column(S.SYSTEM).to_pylist())
    if not set(systems) <= have:
        return group.slice(0, 0)
    order = {n: i for i, n in enumerate([*systems, REFERENCE_SYSTEM])}
    rank = pa.array([order[n] for n in group.column(S.SYSTEM).to_pylist()], pa.int64())
    return group.take(pc.sort_indices(rank))


def answered_by_all(responses, systems: list[str], num_blocks: int):
    """The rows of the prompts every one of `systems` answered (and their references), a prompt's rows together."""
    return by_prompt(responses, _keep_if_all, num_blocks, systems=systems)
