"""What the source text costs per candidate, stored per candidate vs once per prompt (issue 20, item 3).

    .venv/bin/python benchmarks/source_bytes.py /tmp/judge_scale/c20k/01_generate

Reads a stage-1 output (real or from make_candidates.py, either layout) and compares two layouts of the same data:
  per candidate  SOURCE, and PROMPT (whose message repeats the source), on every row (stage 1 before prompts.parquet);
  per prompt     candidates without SOURCE and PROMPT, plus a prompts table (PROMPT_ID, PROMPT, SOURCE) of one
                 row per prompt (stage 1 since prompts.parquet).
For each: the Arrow in-memory size (Table.nbytes) and the parquet size (pyarrow's defaults: snappy, dictionary
encoding where it pays), in total and per candidate. Prints one JSON object.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import schema as S  # noqa: E402
from common.per_prompt import PROMPTS_FILE  # noqa: E402


def parquet_bytes(table, folder: Path, name: str) -> int:
    path = folder / f"{name}.parquet"
    pq.write_table(table, path)
    return path.stat().st_size


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: source_bytes.py <stage-1 output folder>")
    folder = Path(sys.argv[1])
    table = pq.read_table(folder / "data" if (folder / "data").is_dir() else folder)
    if S.SOURCE not in table.column_names:  # stage 1's layout since prompts.parquet: put the prompts back on each row
        prompts = pq.read_table(folder / PROMPTS_FILE, columns=[S.PROMPT_ID, S.PROMPT, S.SOURCE])
        at = pc.index_in(table.column(S.PROMPT_ID), prompts.column(S.PROMPT_ID))
        for name in (S.PROMPT, S.SOURCE):
            table = table.append_column(name, prompts.column(name).take(at))
    n = table.num_rows
    prompts = table.select([S.PROMPT_ID, S.PROMPT, S.SOURCE]).filter(
        table.column(S.CANDIDATE).to_numpy() == table.column(S.CANDIDATE).to_numpy().min())
    assert prompts.num_rows == pc.count_distinct(table.column(S.PROMPT_ID)).as_py(), "a prompt lacks candidate 0"
    slim = table.drop_columns([S.PROMPT, S.SOURCE])
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        per_cand = {"arrow": table.nbytes, "parquet": parquet_bytes(table, t, "candidates")}
        per_prompt = {"arrow": slim.nbytes + prompts.nbytes,
                      "parquet": parquet_bytes(slim, t, "slim") + parquet_bytes(prompts, t, "prompts")}
    out = {"input": str(folder), "candidates": n, "prompts": prompts.num_rows,
           "source_bytes_mean": round(sum(len(s.as_py().encode()) for s in prompts.column(S.SOURCE)) /
                                      prompts.num_rows),
           "per_candidate_layout": per_cand, "per_prompt_layout": per_prompt}
    for k in ("arrow", "parquet"):
        out[f"{k}_bytes_per_candidate"] = {"per_candidate": round(per_cand[k] / n),
                                           "per_prompt": round(per_prompt[k] / n),
                                           "ratio": round(per_cand[k] / per_prompt[k], 2)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
