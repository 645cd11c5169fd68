"""Prompt data: the embedded ACLSum splits or your own file, turned into prompt rows.

Reads jsonl, parquet, a folder of either, or an HF dataset folder written by `save_to_disk`. The config's column map
names which of your columns is the text (or ready-made chat messages), the id and an optional reference. Each prompt
row gets a stable id: your id column, or a hash of the text.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from common import records
from common import schema as S
from common.config import DataConfig, PromptConfig, resolve
from common.errors import UserError
from common.records import is_null, not_parquet

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
PROMPT_SCHEMA = pa.schema([(S.PROMPT_ID, pa.string()), (S.PROMPT, MESSAGES), (S.SOURCE, pa.string()),
                           (S.REFERENCE, pa.string())])


def as_prompt_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """A numpy batch of prompt rows as PROMPT_SCHEMA. After a numpy-format map (stage 1's tokenizer) Ray holds PROMPT
    as Python objects, which it would write pickled: readers refuse those files, rightly."""
    messages = [[{"role": str(m["role"]), "content": str(m["content"])} for m in ms] for ms in batch[S.PROMPT]]
    return pa.Table.from_arrays([pa.array(batch[S.PROMPT_ID].tolist(), pa.string()), pa.array(messages, MESSAGES),
                                 pa.array(batch[S.SOURCE].tolist(), pa.string()),
                                 pa.array(batch[S.REFERENCE].tolist(), pa.string())], schema=PROMPT_SCHEMA)


def read_table(path: Path, where: str) -> pd.DataFrame:
    """A whole file as one table, as pandas reads it (the tests' yardstick for the batched checks)."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                raise UserError(f"{where}: {path} holds splits {list(ds)}; point data.path at one split folder")
            return ds.to_pandas()
        files = sorted([*path.glob("*.jsonl"), *path.glob("*.json"), *path.glob("*.parquet")])
        if not files:
            raise UserError(f"{where}: {path} has no .jsonl/.parquet files and is not a save_to_disk folder")
        return pd.concat([read_table(f, where) for f in files], ignore_index=True)
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise not_parquet(where, path, e) from None
    try:
        if path.suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=path.suffix == ".jsonl", dtype=False)
    except ValueError as e:
        raise UserError(f"{where}: cannot parse {path} ({str(e).splitlines()[0][:120]}); "
                        f"expected one JSON object per line") from None
    raise UserError(f"{where}: {path}: unsupported file type '{path.suffix}' (use .jsonl, .parquet or a folder)")


@dataclass(frozen=True)
class Prompts:
    """Checked prompt data, still on disk: the slices of the files Ray Data's tasks read (common.data.read_prompts)
    and what the check counted. The driver keeps no text: one 8-byte id hash per prompt while checking, then none."""

    slices: tuple[tuple, ...]  # (format, path, first row in the file, rows, byte offset of that row or 0)
    data: DataConfig
    prompt: PromptConfig
    where: str
    count: int  # prompts (rows with a text)
    empty: int  # rows dropped for an empty text

    def __len__(self) -> int:
        return self.count


def scan_prompts(data: DataConfig, prompt: PromptConfig, where: str, actors: int = 1) -> Prompts:
    """Every row checked as `prompt_row` will read it in Ray, in file order (errors name the row), one batch at a time,
    up to `data.limit` rows; the files are cut into slices, enough for a pool of `actors` (num_blocks). Raises
    UserError on bad input."""
    path = resolve(data.path)
    if not path.exists():
        hint = "run `bash scripts/setup.sh` to prepare it" if "data/aclsum" in data.path else "check data.path"
        raise UserError(f"{where}: data.path {data.path} not found; {hint}")
    files = records.data_files(path, where)
    known = [records.file_columns(fmt, p, where) for fmt, p in files]
    exact = all(c is not None for c in known)  # parquet / HF: the schema gives the columns before any row
    columns = {c: None for cols in known if cols for c in cols}
    if exact:
        _check_columns(data, list(columns), where)
    limit = data.limit or float("inf")
    read, count, empty, error, hashes, per_file = 0, 0, 0, None, [], []
    for fmt, p in files:
        offsets, first = [], read
        for batch in records.batches(fmt, p, where, offsets if fmt == "jsonl" else None):
            ids = np.zeros(len(batch), np.uint64)
            for k, rec in enumerate(batch[:int(min(len(batch), limit - read))]):
                read += 1
                columns.update(dict.fromkeys(rec))
                if error:
                    continue  # JSON: read on for the columns, a missing one being the error to report first
                try:
                    row = prompt_row(rec, read, data, prompt, where)
                except UserError as e:
                    error = e
                    continue
                empty += row is None
                if row is not None:
                    count += 1
                    ids[k] = _id_hash(row[S.PROMPT_ID])
            hashes.append(ids[ids != 0])
            if (error and exact) or read >= limit:
                break
        per_file.append((fmt, p, read - first, np.asarray(offsets[:read - first], np.int64)))
        if (error and exact) or read >= limit:
            break
    if not read:
        raise UserError(f"{where}: {data.path} has no rows; nothing to do")
    _check_columns(data, list(columns), where)
    if error:
        raise error
    if not count:
        raise UserError(f"{where}: every row of {data.path} has an empty text column; nothing to do")
    _check_unique(np.concatenate(hashes), per_file, data, prompt, where)
    return Prompts(_slices(per_file, num_blocks(read, actors)), data, prompt, where, count, empty)


def prompt_row(rec: dict, i: int, data: DataConfig, prompt: PromptConfig, where: str) -> dict | None:
    """One input record (row `i` of the data) as a prompt row: PROMPT_ID, PROMPT (chat messages), SOURCE, REFERENCE;
    None for an empty (or whitespace-only) text, which makes no prompt."""
    if "messages" in data.columns:
        messages = _messages(rec.get(data.columns["messages"]), data.columns["messages"], i, where, data.path)
        source = messages[-1]["content"]
    else:
        source = _text(rec.get(data.columns["text"]), data.columns["text"], i, where, data.path)
        messages = ([{"role": "system", "content": prompt.system}] if prompt.system else []) + [
            {"role": "user", "content": prompt.template.format(text=source)}]
    if not source.strip():
        return None
    if "id" in data.columns and is_null(rec.get(data.columns["id"])):
        raise UserError(f"{where}: {data.path} row {i}: id column '{data.columns['id']}' is null; give every row "
                        f"an id, or drop `id` from data.columns to derive ids from the texts")
    pid = str(rec[data.columns["id"]]) if "id" in data.columns else hashlib.sha1(source.encode()).hexdigest()[:12]
    ref = str(rec.get(data.columns.get("reference", ""), "") or "") if "reference" in data.columns else ""
    return {S.PROMPT_ID: pid, S.PROMPT: messages, S.SOURCE: source, S.REFERENCE: ref}


def _check_columns(data: DataConfig, columns: list[str], where: str) -> None:
    missing = [f"{role} -> '{col}'" for role, col in data.columns.items() if col not in columns]
    if missing:
        raise UserError(f"{where}: data.columns maps {', '.join(missing)} but {data.path} has columns "
                        f"{columns}; fix data.columns")


def _id_hash(pid: str) -> int:
    return int.from_bytes(hashlib.blake2b(pid.encode(), digest_size=8).digest(), "little") | 1  # 0 marks "none"


def _check_unique(hashes: np.ndarray, per_file, data: DataConfig, prompt: PromptConfig, where: str) -> None:
    """Whether any prompt id repeats, from the hashes; only then are the rows read again, keeping the ids of those
    hashes, to name the repeated ids."""
    h = np.sort(hashes)
    suspects = set(h[1:][h[1:] == h[:-1]].tolist())
    if not suspects:
        return
    seen, dups = set(), []
    for piece in _slices(per_file, 1):
        for row in _read_slice(*piece, data, prompt, where):
            pid = row[S.PROMPT_ID]
            if _id_hash(pid) in suspects:
                (dups.append if pid in seen else seen.add)(pid)
    if dups:
        what = f"column '{data.columns['id']}' repeats" if "id" in data.columns else "the data repeats texts, ids"
        raise UserError(f"{where}: prompt ids must be unique but {what} {dups[:3]}; deduplicate {data.path}")


def _slices(per_file, blocks: int) -> tuple[tuple, ...]:
    """The checked rows of each file cut into slices of about total / blocks rows, at most SCAN_BATCH_ROWS; a parquet
    file at row-group bounds (a task reads whole groups), a .json document whole (it is parsed whole)."""
    total = sum(n for _, _, n, _ in per_file)
    size = max(1, min(records.SCAN_BATCH_ROWS, -(-total // max(1, blocks))))
    out = []
    for fmt, p, n, offsets in per_file:
        cuts = [0] if fmt == "json" else _group_starts(p, size) if fmt == "parquet" else range(0, n, size)
        bounds = [c for c in cuts if c < n] + [n]
        out += [(fmt, p, a, b - a, int(offsets[a]) if len(offsets) else 0) for a, b in zip(bounds, bounds[1:])]
    return tuple(out)


def _group_starts(path: str, size: int) -> list[int]:
    """Where slices of a parquet file start: row-group bounds, about `size` rows apart."""
    import pyarrow.parquet as pq

    meta, starts, at = pq.ParquetFile(path).metadata, [0], 0
    for g in range(meta.num_row_groups):
        at += meta.row_group(g).num_rows
        if at - starts[-1] >= size:
            starts.append(at)
    return starts


def _read_slice(fmt: str, path: str, start: int, n: int, offset: int, data, prompt, where: str) -> list[dict]:
    """The prompt rows of `n` records of a file from record `start` (a JSON-lines file: from byte `offset`)."""
    if not Path(path).exists():  # checked on the driver's node: this task may run on another
        import socket

        raise UserError(f"{where}: data.path {path} is not on node {socket.gethostname()}, where a Ray task reads it; "
                        f"on a cluster put the data on storage every node mounts, at the same absolute path")
    if fmt == "jsonl":
        recs = []
        with open(path, "rb") as f:
            f.seek(offset)
            for line in f:
                if len(recs) == n:
                    break
                if line.strip():
                    recs.append(records.json_line(line, path, where, None))
    elif fmt == "parquet":
        recs = _parquet_rows(path, start, n)
    elif fmt == "hf":
        recs = records.hf_dataset(path, where).select(range(start, start + n)).to_list()
    else:
        recs = records.json_document(path, where)[start:start + n]
    rows = (prompt_row(r, 0, data, prompt, where) for r in recs)
    return [r for r in rows if r is not None]


def _parquet_rows(path: str, start: int, n: int) -> list[dict]:
    """Records start .. start + n of a parquet file, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    groups, first, at = [], None, 0
    for g in range(f.num_row_groups):
        rows = f.metadata.row_group(g).num_rows
        if at + rows > start and at < start + n:
            groups.append(g)
            first = at if first is None else first
        at += rows
    if not groups:
        return []
    table = f.read_row_groups(groups)
    return table.slice(start - first, n).to_pylist()


def load_prompts(data: DataConfig, prompt: PromptConfig, where: str) -> tuple[list[dict], int]:
    """Every prompt row in a list, and how many rows were dropped for an empty text: for a bounded set (HF's peer in
    benchmarks/, the tests). The stages read them with Ray Data instead (read_prompts)."""
    prompts = scan_prompts(data, prompt, where)
    return list(_each_prompt(prompts)), prompts.empty


def prompt_ids(prompts: Prompts) -> list[str]:
    """The checked prompts' ids in data order, read a slice at a time (stage 4 checks outputs files against them)."""
    return [r[S.PROMPT_ID] for r in _each_prompt(prompts)]


def _each_prompt(prompts: Prompts):
    """The checked prompt rows, on this process, one slice in memory at a time."""
    for s in prompts.slices:
        yield from _read_slice(*s, prompts.data, prompts.prompt, prompts.where)


def read_prompts(prompts: Prompts):
    """The checked prompt rows as a Ray Data dataset, one block per slice (set at read time: no repartition later,
    while actors may hold the CPUs). Ray's tasks read the files; the driver hands over only where the slices lie."""
    import ray

    names = ("fmt", "path", "start", "n", "offset")
    return ray.data.from_items([dict(zip(names, s)) for s in prompts.slices],
                               override_num_blocks=len(prompts.slices)).map_batches(
        _read_slices, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
        fn_kwargs={"data": prompts.data, "prompt": prompts.prompt, "where": prompts.where})


def _read_slices(batch, data, prompt, where: str):
    rows = [r for s in batch.to_pylist() for r in _read_slice(**s, data=data, prompt=prompt, where=where)]
    return pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)


def _text(x, col: str, row: int, where: str, path: str) -> str:
    if is_null(x):
        return ""  # an empty text: dropped and counted
    if not isinstance(x, (str, int, float)):
        raise UserError(f"{where}: {path} row {row}: column '{col}' holds a {type(x).__name__}, not a text; map "
                        f"data.columns.text to a string column (ready-made chat messages go in data.columns.messages)")
    return str(x)


def _messages(x, col: str, row: int, where: str, path: str) -> list[dict]:
    x = x.tolist() if hasattr(x, "tolist") else x  # parquet hands lists over as numpy arrays
    if not (isinstance(x, list) and x and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                              and isinstance(m.get("content"), str) for m in x)):
        raise UserError(f"{where}: {path} row {row}: column '{col}' must be a non-empty list of {{role, content}} "
                        f"chat messages, got {type(x).__name__} {str(x)[:40]!r}; map a text column with "
                        f"data.columns.text instead")
    return [{"role": m["role"], "content": m["content"]} for m in x]


def num_blocks(rows: int, actors: int, per_worker: int = 4) -> int:
    """Blocks to split `rows` into for a pool of `actors`: a few per actor, so every actor has work while the next
    block streams in, and never more blocks than rows (set at read time: no repartition while actors hold the CPUs)."""
    return max(1, min(rows, per_worker * max(1, actors)))
