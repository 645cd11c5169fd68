"""Stage 2's driver does not hold the candidates (issue 20): its peak RSS stays below a bound the data would break.

Stage 2 runs as a user runs it (its own process and local Ray, as conftest.run_stage), on synthetic stage-1 output
from benchmarks/make_candidates.py: 4000 candidates whose sources are ~60 kB each, in stage 1's older layout that
carries the prompt on every candidate (the prompt repeats the source, so ~120 kB a row, ~480 MB of Arrow in all: the
heaviest input stage 2 still reads), with the `length` judge (no model). benchmarks/driver_runner.py runs the
stage in-process and reports the driver's own peak RSS (VmHWM): Ray's workers, raylet and GCS are not counted.

The bound is the driver's start-up cost plus one copy of the candidates in Arrow (459 MiB here): a driver that never
holds the candidate table stays under it, one that reads it whole does not. The start-up cost is measured here, on
40 candidates with 1 kB sources: 323 MiB on 2026-12-03 (2 cores, Ray 2.60), so the bound was 782 MiB.
On the code as it was then (stage 2 reads every candidate with `pq.read_table`, puts them into Ray with `from_arrow`
and pulls them back with `to_pandas()`) the driver peaked at 2966 MiB, 3.8x the bound, and this test failed, as
it should.

`resource.setrlimit` is not the limit here: RLIMIT_AS counts the virtual mappings of Ray and torch (gigabytes
before any data), and RLIMIT_DATA (tried at 1.6 GB, `prlimit --data`) stops even the 40-candidate run
("RuntimeError: can't start new thread": thread stacks and malloc arenas count as data); both would be inherited
by Ray's processes too. The peak RSS of the driver alone is what the issue is about.
"""
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from common.config import REPO

pytestmark = pytest.mark.slow  # starts Ray in stage subprocesses: not in `scripts/test.sh --fast`

sys.path.insert(0, str(REPO / "benchmarks"))
from make_candidates import make_candidates  # noqa: E402

RUNNER = REPO / "benchmarks" / "driver_runner.py"
CANDIDATES, SOURCE_BYTES = 4000, 60_000


def arrow_mib(folder: Path) -> float:
    """The candidates' size in Arrow (what a reader holds), one file at a time (parquet footers undercount it:
    their sizes are after encoding)."""
    return sum(pq.read_table(f).nbytes for f in sorted((folder / "data").glob("*.parquet"))) / 2**20


def judge_driver(output_dir: Path) -> tuple[float, subprocess.CompletedProcess]:
    """Stage 2 with the length judge; (the driver's peak RSS in MiB, the process)."""
    cmd = [sys.executable, str(RUNNER), "02_judge/judge.py", "--config", "configs/quickstart/02_judge.yaml",
           "--set", f"output_dir={output_dir}", "--set", "judge.type=length"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("DRIVER_RESULT ")][-1]
    return json.loads(line.split(" ", 1)[1])["driver_peak_rss_mib"], proc


def test_stage2_driver_peak_rss_stays_below_one_copy_of_the_candidates(tmp_path):
    make_candidates(tmp_path / "small", 40, source_bytes=1000)
    big = make_candidates(tmp_path / "big", CANDIDATES, source_bytes=SOURCE_BYTES, inline=True)
    data_mib = arrow_mib(Path(big["dir"]))
    assert data_mib > 300, data_mib  # large enough that holding it shows

    startup, _ = judge_driver(tmp_path / "small")
    peak, proc = judge_driver(tmp_path / "big")

    m = json.loads((tmp_path / "big" / "02_judge" / "manifest.json").read_text())
    assert m["stats"]["candidates"] == CANDIDATES and m["rows"]["pairs"] > 0  # it did the whole job
    assert set(m["stats"]["filtered_by_reason"]) == {"empty", "too_short", "too_long", "invalid_chars", "duplicate"}
    bound = startup + data_mib
    assert peak < bound, (f"stage 2's driver peaked at {peak:.0f} MiB on {CANDIDATES} candidates ({data_mib:.0f} "
                          f"MiB of Arrow); start-up alone {startup:.0f} MiB, so the bound is {bound:.0f} MiB: the "
                          f"driver holds the candidates")
