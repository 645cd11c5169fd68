"""Input files read where they lie: the formats stages 1, 3 and 4 accept (.parquet, .jsonl, .json, a folder of them,
or an HF `save_to_disk` folder) and their records in bounded batches, for the checks the driver runs before Ray
starts (common.data for prompts, common.pairs for preference pairs)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pandas as pd

from common.errors import UserError

SCAN_BATCH_ROWS = 4096  # rows per batch while checking: the driver holds one batch of parsed rows at a time


def is_null(x) -> bool:
    """A missing cell as pandas hands it over: None, NaN or pd.NA."""
    return x is None or x is pd.NA or (isinstance(x, float) and x != x)


def not_parquet(where: str, path: Path, e: Exception) -> UserError:
    return UserError(f"{where}: cannot read {path}: it is not a Parquet file ({str(e).splitlines()[0][:80]}); "
                     f"give a .parquet written by pandas/pyarrow, or name it .jsonl if it holds JSON lines")


def data_files(path: Path, label: str) -> list[tuple[str, str]]:
    """(format, path) of every file `path` stands for, in order: "parquet" | "jsonl" | "json" | "hf"."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return [("hf", str(path))]
        files = sorted([*path.glob("*.jsonl"), *path.glob("*.json"), *path.glob("*.parquet")])
        if not files:
            raise UserError(f"{label}: {path} has no .jsonl/.parquet files and is not a save_to_disk folder")
        return [f for p in files for f in data_files(p, label)]
    fmt = path.suffix.lstrip(".")
    if fmt not in ("parquet", "jsonl", "json"):
        raise UserError(f"{label}: {path}: unsupported file type '{path.suffix}' (use .jsonl, .parquet or a folder)")
    return [(fmt, str(path))]


def file_columns(fmt: str, path: str, label: str) -> list[str] | None:
    """A file's columns when its schema says them (parquet, HF); None for JSON, whose rows each say their own."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).schema_arrow.names
        except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise not_parquet(label, Path(path), e) from None
    if fmt == "hf":
        return list(hf_dataset(path, label).column_names)
    return None


def hf_dataset(path: str, label: str):
    import datasets

    ds = datasets.load_from_disk(path)  # memory-mapped
    if isinstance(ds, datasets.DatasetDict):
        raise UserError(f"{label}: {path} holds splits {list(ds)}; point at one split folder")
    return ds


def batches(fmt: str, path: str, label: str, offsets: list | None = None) -> Iterator[list[dict]]:
    """A file's records in batches of at most SCAN_BATCH_ROWS, in file order. For JSON lines, `offsets` (a list)
    gets the byte offset of each record's line, so a task can later read a slice of the file from there."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for b in pq.ParquetFile(path).iter_batches(batch_size=SCAN_BATCH_ROWS):
            yield b.to_pylist()
    elif fmt == "hf":
        for b in hf_dataset(path, label).iter(batch_size=SCAN_BATCH_ROWS):
            yield [dict(zip(b, vals)) for vals in zip(*b.values())]
    elif fmt == "json":  # one JSON document: it has to be parsed whole
        yield json_document(path, label)
    else:
        batch, at = [], 0
        with open(path, "rb") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    batch.append(json_line(line, path, label, n))
                    if offsets is not None:
                        offsets.append(at)
                at += len(line)
                if len(batch) == SCAN_BATCH_ROWS:
                    yield batch
                    batch = []
        if batch:
            yield batch


def json_line(line: bytes | str, path: str, label: str, n: int | None) -> dict:
    try:
        rec = json.loads(line)
    except ValueError as e:
        raise UserError(f"{label}: cannot parse {path} (line {n}: {str(e)[:120]}); expected one JSON object per "
                        f"line") from None
    if not isinstance(rec, dict):
        raise UserError(f"{label}: cannot parse {path} (line {n} is a {type(rec).__name__}); expected one JSON "
                        f"object per line")
    return rec


def json_document(path: str, label: str) -> list[dict]:
    try:
        return pd.read_json(path, dtype=False).to_dict("records")
    except ValueError as e:
        raise UserError(f"{label}: cannot parse {path} ({str(e).splitlines()[0][:120]}); "
                        f"expected one JSON object per line") from None
