"""Prompt data: the embedded ACLSum splits or your own file, turned into prompt rows.

Reads jsonl, parquet, a folder of either, or an HF dataset folder written by `save_to_disk`. The config's column map
names which of your columns is the text (or ready-made chat messages), the id and an optional reference. Each prompt
row gets a stable id: your id column, or a hash of the text.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from common import schema as S
from common.config import DataConfig, PromptConfig, resolve
from common.errors import UserError


def read_table(path: Path, where: str) -> pd.DataFrame:
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


def not_parquet(where: str, path: Path, e: Exception) -> UserError:
    return UserError(f"{where}: cannot read {path}: it is not a Parquet file ({str(e).splitlines()[0][:80]}); "
                     f"give a .parquet written by pandas/pyarrow, or name it .jsonl if it holds JSON lines")


def load_prompts(data: DataConfig, prompt: PromptConfig, where: str) -> tuple[list[dict], int]:
    """Prompt rows: PROMPT_ID, PROMPT (chat messages), SOURCE, REFERENCE; and how many rows were dropped for an
    empty (or whitespace-only) text, for the manifest and the summary line. Raises UserError on bad input."""
    path = resolve(data.path)
    if not path.exists():
        hint = "run `bash scripts/setup.sh` to prepare it" if "data/aclsum" in data.path else "check data.path"
        raise UserError(f"{where}: data.path {data.path} not found; {hint}")
    df = read_table(path, where)
    if data.limit:
        df = df.head(data.limit)
    if df.empty:
        raise UserError(f"{where}: {data.path} has no rows; nothing to do")
    missing = [f"{role} -> '{col}'" for role, col in data.columns.items() if col not in df.columns]
    if missing:
        raise UserError(f"{where}: data.columns maps {', '.join(missing)} but {data.path} has columns "
                        f"{list(df.columns)}; fix data.columns")
    rows, empty = [], 0
    for i, rec in enumerate(df.to_dict("records"), start=1):
        if "messages" in data.columns:
            messages = _messages(rec[data.columns["messages"]], data.columns["messages"], i, where, data.path)
            source = messages[-1]["content"]
        else:
            source = _text(rec[data.columns["text"]], data.columns["text"], i, where, data.path)
            messages = ([{"role": "system", "content": prompt.system}] if prompt.system else []) + [
                {"role": "user", "content": prompt.template.format(text=source)}]
        if not source.strip():
            empty += 1  # an empty text makes no prompt
            continue
        if "id" in data.columns and is_null(rec[data.columns["id"]]):
            raise UserError(f"{where}: {data.path} row {i}: id column '{data.columns['id']}' is null; give every row "
                            f"an id, or drop `id` from data.columns to derive ids from the texts")
        pid = str(rec[data.columns["id"]]) if "id" in data.columns else \
            hashlib.sha1(source.encode()).hexdigest()[:12]
        ref = str(rec.get(data.columns.get("reference", ""), "") or "") if "reference" in data.columns else ""
        rows.append({S.PROMPT_ID: pid, S.PROMPT: messages, S.SOURCE: source, S.REFERENCE: ref})
    if not rows:
        raise UserError(f"{where}: every row of {data.path} has an empty text column; nothing to do")
    seen, dups = set(), []
    for r in rows:
        (dups.append if r[S.PROMPT_ID] in seen else seen.add)(r[S.PROMPT_ID])
    if dups:
        what = f"column '{data.columns['id']}' repeats" if "id" in data.columns else "the data repeats texts, ids"
        raise UserError(f"{where}: prompt ids must be unique but {what} {dups[:3]}; deduplicate {data.path}")
    return rows, empty


def is_null(x) -> bool:
    """A missing cell as pandas hands it over: None, NaN or pd.NA."""
    return x is None or x is pd.NA or (isinstance(x, float) and x != x)


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
