"""Stage 1's prompts checked before Ray without holding them (common.data.scan_prompts), then read from the files by
Ray Data's tasks (read_prompts): the same rows, in the same order, as reading the whole file into one table, in every
input format, with `data.limit`, and the same errors naming the same rows."""
import json
import tracemalloc

import datasets
import pandas as pd
import pytest

from common import records
from common import schema as S
from common.config import DataConfig, PromptConfig
from common.data import load_prompts, prompt_row, read_prompts, read_table, scan_prompts
from common.errors import UserError

PROMPT = PromptConfig(system="Be brief.", template="Summarize: {text}")
COLUMNS = {"id": "ticket", "text": "body", "reference": "summary"}


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"ticket": f"t{i}", "body": "" if i % 9 == 4 else f"Ticket {i} text.", "summary": f"S{i}."}
            for i in range(start, start + n)]


def write(path, recs, fmt: str):
    df = pd.DataFrame(recs)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    elif fmt == "json":
        path.write_text(json.dumps(recs))
    elif fmt == "parquet":
        df.to_parquet(path, row_group_size=5)  # several row groups: slices follow them
    else:
        datasets.Dataset.from_pandas(df).save_to_disk(str(path))
    return path


def whole_table(data: DataConfig) -> list[dict]:
    """The yardstick: the whole data as one pandas table, then each record as `prompt_row` makes it."""
    from common.config import resolve

    df = read_table(resolve(data.path), "x.yaml")
    df = df.head(data.limit) if data.limit else df
    made = [prompt_row(r, i, data, PROMPT, "x.yaml") for i, r in enumerate(df.to_dict("records"), start=1)]
    return [r for r in made if r is not None]


def error(data: DataConfig) -> str:
    with pytest.raises(UserError) as e:
        scan_prompts(data, PROMPT, "x.yaml")
    return str(e.value)


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(records, "SCAN_BATCH_ROWS", 7)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "hf"])
@pytest.mark.parametrize("limit", [None, 12])
def test_same_rows_as_the_whole_table(tmp_path, small_batches, fmt, limit):
    path = write(tmp_path / f"p.{fmt}" if fmt != "hf" else tmp_path / "hf", rows(40), fmt)
    data = DataConfig(path=str(path), columns=COLUMNS, limit=limit)
    got, empty = load_prompts(data, PROMPT, "x.yaml")
    want = whole_table(data)
    assert got == want and len(want) == (11 if limit else 36) and empty == (1 if limit else 4)
    s = scan_prompts(data, PROMPT, "x.yaml", actors=2)
    assert s.count == len(want) and s.empty == empty
    assert sum(sl[3] for sl in s.slices) == (limit or 40)  # every row read once, the limit honoured
    if fmt == "json":
        assert len(s.slices) == 1  # one document, parsed whole: one task
    else:
        assert len(s.slices) > 1 and max(sl[3] for sl in s.slices) <= 7


def test_a_folder_of_files_in_order_with_the_limit_across_files(tmp_path, small_batches):
    folder = tmp_path / "d"
    folder.mkdir()
    write(folder / "a.jsonl", rows(10), "jsonl")
    write(folder / "b.parquet", rows(10, 10), "parquet")
    data = DataConfig(path=str(folder), columns=COLUMNS, limit=15)
    got, _ = load_prompts(data, PROMPT, "x.yaml")
    assert got == whole_table(data) and got[-1][S.PROMPT_ID] == "t14"


def test_errors_name_the_row_across_batches(tmp_path, small_batches):
    recs = rows(30)
    recs[19]["body"] = ["not", "a", "text"]
    data = DataConfig(path=str(write(tmp_path / "p.jsonl", recs, "jsonl")), columns=COLUMNS)
    assert "row 20: column 'body' holds a list" in error(data)
    recs[19]["body"], recs[25]["ticket"] = "Fine.", None
    write(tmp_path / "p.jsonl", recs, "jsonl")
    assert "row 26: id column 'ticket' is null" in error(data)
    bad = tmp_path / "q.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows(12)) + "not json\n")
    assert "line 13" in error(DataConfig(path=str(bad), columns=COLUMNS))
    assert "has no rows" in error(DataConfig(path=str(write(tmp_path / "e.jsonl", [], "jsonl")), columns=COLUMNS))


def test_a_missing_column_is_named_before_a_bad_row(tmp_path, small_batches):
    recs = rows(20)
    recs[3]["body"] = ["x"]
    data = DataConfig(path=str(write(tmp_path / "p.jsonl", recs, "jsonl")), columns={**COLUMNS, "id": "id"})
    assert "data.columns maps id -> 'id' but" in error(data)


def test_repeated_ids_across_batches_and_files_are_named(tmp_path, small_batches):
    folder = tmp_path / "d"
    folder.mkdir()
    write(folder / "a.jsonl", rows(20), "jsonl")
    write(folder / "b.parquet", rows(5, 15) + rows(1, 2), "parquet")
    msg = error(DataConfig(path=str(folder), columns=COLUMNS))
    assert "prompt ids must be unique but column 'ticket' repeats ['t15', 't16', 't17']" in msg


def test_the_check_holds_one_batch_not_the_data(tmp_path):
    """50k prompts of ~300 bytes: reading them into one table and a list of rows, as stage 1 did before, peaked at
    ~200 MB of Python allocations; the scan keeps a batch and the 8-byte id hashes."""
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(50_000):
            f.write(json.dumps({"ticket": f"t{i}", "body": f"Ticket {i}. " + "words " * 40}) + "\n")
    tracemalloc.start()
    try:
        s = scan_prompts(DataConfig(path=str(path), columns={"id": "ticket", "text": "body"}), PROMPT, "x.yaml")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert s.count == 50_000
    assert peak < 20e6, f"{peak / 1e6:.0f} MB"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_ray_reads_the_same_rows_in_several_blocks(tmp_path, ray_local, fmt):
    path = write(tmp_path / f"p.{fmt}", rows(40), fmt)
    data = DataConfig(path=str(path), columns=COLUMNS, limit=33)
    prompts = scan_prompts(data, PROMPT, "x.yaml", actors=2)
    ds = read_prompts(prompts).materialize()
    assert ds.num_blocks() == len(prompts.slices) > 1
    want = {r[S.PROMPT_ID]: r for r in whole_table(data)}
    got = {r[S.PROMPT_ID]: {k: r[k] for k in (S.PROMPT_ID, S.PROMPT, S.SOURCE, S.REFERENCE)} for r in ds.take_all()}
    assert got == want and len(got) == 29  # 33 rows, 4 of them without a text


def test_a_task_on_a_node_without_the_file_says_so_in_one_line(tmp_path):
    """On a cluster, a read task may run on a node that does not mount data.path (checked on the driver's node)."""
    from common.data import _read_slice

    with pytest.raises(UserError, match="is not on node .*storage every node mounts"):
        _read_slice("jsonl", str(tmp_path / "gone.jsonl"), 0, 5, 0, DataConfig(columns=COLUMNS), PROMPT, "x.yaml")
