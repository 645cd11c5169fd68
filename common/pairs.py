"""Preference pairs, read where they lie: checked before Ray starts in bounded batches (nothing per pair is kept on
the driver but an 8-byte hash of its id), then read again by Ray Data, which turns each row into the same
{pair_id, prompt, chosen, rejected} with the same function (`pair_row`).

TRL's three preference formats: standard (strings), conversational (messages) and implicit-prompt (no prompt
column; chosen and rejected are whole conversations sharing the prompt). Files: .parquet, .jsonl, .json (one JSON
document, read whole: JSON lines stream, a document cannot), a folder of them, or an HF `save_to_disk` folder.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import schema as S
from common.errors import UserError
from common.records import batches, data_files, file_columns, hf_dataset, is_null, json_document
from common.tokenize import empty_response, response_text

@dataclass(frozen=True)
class Pairs:
    """Checked pairs, still on disk: the files Ray Data reads, in file order, and what the checks counted."""

    files: tuple[tuple[str, str], ...]  # (format, path): "parquet" | "jsonl" | "json" | "hf"
    where: str
    implicit: bool  # no prompt column: TRL's implicit-prompt format
    count: int
    empty: int  # an empty (blank) chosen or rejected response (dropped by the tokeniser, counted)
    identical: int  # otherwise chosen identical to rejected (dropped by the tokeniser, counted)
    rows_per_file: tuple[int, ...]

    def __len__(self) -> int:
        return self.count


# ------------------------------------------------------------------------------------------- one row
def _messages(x, role: str, col: str, row: int, where: str) -> list[dict]:
    """One cell as chat messages: a string is one message of `role` (TRL's standard format), a list of
    {role, content} is taken as is (conversational). Anything else is named with its row."""
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    if hasattr(x, "tolist"):
        x = x.tolist()  # parquet hands lists over as numpy arrays
    if isinstance(x, list) and x and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                         and isinstance(m.get("role"), str) for m in x):
        return [{"role": m["role"], "content": m["content"]} for m in x]
    got = "null" if is_null(x) else f"{type(x).__name__} {str(x)[:40]!r}"
    raise UserError(f"{where}: row {row}: column '{col}' is {got}; expected a string or a non-empty list of "
                    f"{{role, content}} messages (TRL's standard or conversational format); fix or remove that row")


def split_implicit(chosen: list[dict], rejected: list[dict], row: int, where: str) -> tuple[list, list, list]:
    """TRL's implicit-prompt format (trl.data_utils.extract_prompt): chosen and rejected are whole conversations;
    the messages they share from the start are the prompt, what follows is each side's response."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    fix = "give a prompt column, or make chosen and rejected the same conversation up to one differing last reply"
    if n == 0:
        raise UserError(f"{where}: row {row}: chosen and rejected share no leading message, so there is no prompt "
                        f"(implicit-prompt format: no prompt column); {fix}")
    for side, tail in (("chosen", chosen[n:]), ("rejected", rejected[n:])):
        if len(tail) != 1:
            what = "nothing" if not tail else f"{len(tail)} messages"
            raise UserError(f"{where}: row {row}: {side} has {what} after the messages it shares with the other "
                            f"side; a pair needs exactly one reply on each side after the shared prompt; {fix}")
    return chosen[:n], chosen[n:], rejected[n:]


def pair_row(rec: dict, row: int, where: str, implicit: bool) -> dict:
    """One input record as {pair_id, prompt, chosen, rejected} (conversational), or a UserError naming its row. A
    pair without an id gets a hash of its messages (the reference cache is keyed by it: do not change it)."""
    chosen = _messages(rec.get(S.CHOSEN), "assistant", S.CHOSEN, row, where)
    rejected = _messages(rec.get(S.REJECTED), "assistant", S.REJECTED, row, where)
    if implicit:
        prompt, chosen, rejected = split_implicit(chosen, rejected, row, where)
    else:
        prompt = _messages(rec.get(S.PROMPT), "user", S.PROMPT, row, where)
    pid = rec.get(S.PAIR_ID)
    if is_null(pid) or pid == "":  # a null id is no id: hash the pair instead
        pid = hashlib.sha1(json.dumps([prompt, chosen, rejected], sort_keys=True).encode()).hexdigest()[:16]
    return {S.PAIR_ID: str(pid), S.PROMPT: prompt, S.CHOSEN: chosen, S.REJECTED: rejected}


def _rows(df, where: str, if_empty: str) -> list[dict]:
    """A DataFrame's pairs as rows, for callers that already hold one (tests, small files)."""
    _check_columns(list(df.columns), where)
    if df.empty:
        raise UserError(f"{where}: no pairs; {if_empty}")
    implicit = S.PROMPT not in df.columns
    return [pair_row(rec, i, where, implicit) for i, rec in enumerate(df.to_dict("records"), start=1)]


def _check_columns(columns: list[str], where: str) -> None:
    missing = [c for c in (S.CHOSEN, S.REJECTED) if c not in columns]
    if missing:
        raise UserError(f"{where}: preference pairs need columns prompt, chosen, rejected (TRL format; or chosen and "
                        f"rejected alone as whole conversations); missing {missing}, found {columns}")


# ------------------------------------------------------------------------------------------- the check
@dataclass
class _Scan:
    implicit: bool | None
    columns: dict
    count: int = 0
    empty: int = 0
    identical: int = 0
    error: UserError | None = None


def scan_pairs(path: Path, label: str, where: str, if_empty: str) -> Pairs:
    """Every row checked as `pair_row` will read it in Ray, in file order (errors name the row), one batch at a time:
    kept are the counts and one 8-byte hash per pair id, for the duplicate check."""
    files = data_files(path, label)
    known = [file_columns(fmt, p, label) for fmt, p in files]
    exact = all(c is not None for c in known)  # parquet / HF: the schema gives the columns before any row
    columns = {c: None for cols in known if cols for c in cols}
    scan, hashes, per_file = _scan(files, label, where, (S.PROMPT not in columns) if exact else None, exact)
    cols = list(columns if exact else scan.columns)
    _check_columns(cols, where)
    if not scan.count:
        raise UserError(f"{where}: no pairs; {if_empty}")
    if scan.implicit != (S.PROMPT not in cols):  # JSON rows that disagree on having a prompt: read with the column
        scan, hashes, per_file = _scan(files, label, where, S.PROMPT not in cols, True)
    if scan.error:
        raise scan.error
    _check_unique(np.concatenate(hashes), files, label, where, scan.implicit)
    return Pairs(files=tuple(files), where=where, implicit=scan.implicit, count=scan.count, empty=scan.empty,
                 identical=scan.identical, rows_per_file=tuple(per_file))


def _scan(files, label: str, where: str, implicit: bool | None, stop_at_error: bool):
    """One pass. After the first bad row, JSON is still read to the end for its columns: a column no row has is
    the error to report, as when the whole file was one table."""
    scan, hashes, per_file = _Scan(implicit, {}), [], []
    for fmt, p in files:
        start = scan.count
        for batch in batches(fmt, p, label):
            ids = np.zeros(len(batch), np.uint64)
            for k, rec in enumerate(batch):
                scan.count += 1
                scan.columns.update(dict.fromkeys(rec))
                if scan.error:
                    continue
                if scan.implicit is None:
                    scan.implicit = S.PROMPT not in rec
                try:
                    r = pair_row(rec, scan.count, where, scan.implicit)
                except UserError as e:
                    scan.error = e
                    if stop_at_error:
                        return scan, hashes, per_file
                    continue
                ids[k] = id_hash(r[S.PAIR_ID])
                chosen, rejected = response_text(r[S.CHOSEN]), response_text(r[S.REJECTED])
                blank = empty_response(chosen, rejected)
                scan.empty += blank
                scan.identical += not blank and chosen == rejected
            hashes.append(ids)
        per_file.append(scan.count - start)
    return scan, hashes or [np.zeros(0, np.uint64)], per_file


def shuffle_key(seed: int, pair_id: str) -> int:
    """Where a pair lands in stage 3's fixed shuffle: a seeded 63-bit hash of its id (sorted on, in Ray Data)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\x1f{pair_id}".encode(), digest_size=8).digest(), "little") >> 1


def id_hash(pair_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(pair_id.encode(), digest_size=8).digest(), "little")


def _check_unique(hashes: np.ndarray, files, label: str, where: str, implicit: bool) -> None:
    """In the file's row order: the reference cache joins by pair id, one to one. The hashes find whether any id
    repeats; only then are the files read again, keeping the ids of those hashes, to name the two rows."""
    h = np.sort(hashes)
    suspects = set(h[1:][h[1:] == h[:-1]].tolist())
    if not suspects:
        return
    first: dict[str, int] = {}
    row = 0
    for fmt, p in files:
        for batch in batches(fmt, p, label):
            for rec in batch:
                row += 1
                pid = pair_row(rec, row, where, implicit)[S.PAIR_ID]
                if id_hash(pid) in suspects and first.setdefault(pid, row) != row:
                    raise UserError(f"{where}: pair id '{pid}' appears twice (rows {first[pid]} and {row}); pair "
                                    f"ids must be unique: remove the repeated pair or give it its own {S.PAIR_ID}")


# ------------------------------------------------------------------------------------------- in Ray Data
def read_pairs(pairs: Pairs, blocks: int):
    """The checked files as a Ray Data dataset of {pair_id, prompt, chosen, rejected}, in about `blocks` blocks
    (set at read time: no repartition later, while actors may hold the CPUs). Read by Ray's tasks, not the driver;
    except a .json document (parsed whole, as it must be) and an HF folder (memory-mapped, handed over in slices)."""
    import ray

    groups: dict[str, tuple[list[str], int]] = {}
    for (fmt, path), n in zip(pairs.files, pairs.rows_per_file):
        if n:
            paths, total = groups.get(fmt, ([], 0))
            groups[fmt] = ([*paths, path], total + n)
    parts = []
    for fmt, (paths, n) in groups.items():
        k = max(1, min(n, round(blocks * n / pairs.count)))
        if fmt == "parquet":
            ds = ray.data.read_parquet(paths, override_num_blocks=k)
        elif fmt == "jsonl":
            ds = ray.data.read_text(paths, override_num_blocks=k)  # one row a line; parsed by _pair_batch
        else:
            ds = ray.data.from_arrow(_slices(_driver_table(fmt, paths, pairs), k))
        parts.append(ds.map_batches(_pair_batch, batch_size=None, batch_format="pyarrow", num_cpus=0.25,
                                    fn_kwargs={"fmt": fmt, "implicit": pairs.implicit, "where": pairs.where}))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _driver_table(fmt: str, paths: list[str], pairs: Pairs):
    import pyarrow as pa

    if fmt == "hf":
        return hf_dataset(paths[0], pairs.where).data.table  # memory-mapped
    rows = [pair_row(r, i, pairs.where, pairs.implicit) for p in paths for i, r in enumerate(
        json_document(p, pairs.where), start=1)]  # a .json document: already normalised, so _pair_batch takes it as is
    return pa.Table.from_pylist([{S.PAIR_ID: r[S.PAIR_ID], "json": json.dumps(r)} for r in rows])


def _slices(table, k: int) -> list:
    size = -(-table.num_rows // k)
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


def _pair_batch(batch, fmt: str, implicit: bool, where: str) -> dict[str, np.ndarray]:
    if fmt == "jsonl":
        rows = [pair_row(json.loads(t), 0, where, implicit) for t in batch.column("text").to_pylist()]
    elif fmt == "json":
        rows = [json.loads(t) for t in batch.column("json").to_pylist()]
    else:
        rows = [pair_row(r, 0, where, implicit) for r in batch.to_pylist()]
    out = {}
    for col in (S.PAIR_ID, S.PROMPT, S.CHOSEN, S.REJECTED):
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [r[col] for r in rows]
        out[col] = arr
    return out
