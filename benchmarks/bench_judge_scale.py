"""Stage 2 and stage 3's data preparation at scale: driver peak RSS and throughput vs candidate count (issue 20).

    flock /tmp/ray-test.lock .venv/bin/python benchmarks/bench_judge_scale.py                   # 20k, 200k
    flock /tmp/ray-test.lock .venv/bin/python benchmarks/bench_judge_scale.py --sizes 20k,200k,1m
    flock /tmp/ray-test.lock .venv/bin/python benchmarks/bench_judge_scale.py --sizes 2k --startup 0   # smoke

For each size: synthetic stage-1 candidates (benchmarks/make_candidates.py, cached under --work), then
  stage 2  `02_judge/judge.py` with the `length` judge (no model: what is measured is the data path around the judge;
           the quickstart's filters and pairing, `pairing.valid_fraction=0`), then
  stage 3  `03_dpo_train/train.py` on those pairs, up to the trainer start: benchmarks/driver_runner.py --stop-at-fit
           replaces `TorchTrainer.fit` with an exit, so reading, tokenising (materialised) and building the reference
           pipeline run, and no model step does. Skipped when stage 2 did not finish.
Each is its own process, run through benchmarks/driver_runner.py: the driver's peak RSS is its `VmHWM` (the
kernel's high-water mark), read by the runner at exit and polled here from /proc every 0.1 s (Ray's workers, raylet
and GCS are other processes and not counted). A watchdog kills the run (its whole process tree) once the driver's
RSS passes --rss-cap-mib and records "killed above cap", so the old, driver-bound code cannot take the machine down.

Throughput is rows over the process's wall time (candidates/s for stage 2, also pairs/s for stage 3), and "net":
rows over wall time less a fixed cost, the wall time of the same stage on --startup candidates (interpreter, imports,
Ray start), so that 20k is not penalised for a start-up 200k amortises. Stage 2 also gets the judge part alone
(candidates / the manifest's `judge_seconds`, when the manifest has it). The issue's targets are graded on each
larger size against the smallest: driver peak RSS grows < 1.3x, net rows/s within 20 %.
Writes benchmarks/results/judge-scale-<date>.json (or --out) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (PY, REPO, _status_kib, bench_env, descendants, loadavg, machine,  # noqa: E402
                     result_marker_json, save)
from make_candidates import make_candidates  # noqa: E402

RUNNER = str(REPO / "benchmarks" / "driver_runner.py")
TARGETS = {"driver_rss_growth_max": 1.3, "throughput_within": 0.20}


def size_arg(text: str) -> list[int]:
    mult = {"k": 1_000, "m": 1_000_000}
    return [int(float(s[:-1]) * mult[s[-1].lower()]) if s[-1].lower() in mult else int(s)
            for s in text.split(",") if s]


def label(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


class Watch(threading.Thread):
    """Polls the driver's VmHWM (peak) and VmRSS; past `cap_kib` it kills the driver and everything under it."""

    def __init__(self, proc: subprocess.Popen, cap_kib: int):
        super().__init__(daemon=True)
        self.proc, self.cap = proc, cap_kib
        self.hwm_kib, self.killed = 0, False

    def run(self) -> None:
        while self.proc.poll() is None:
            self.hwm_kib = max(self.hwm_kib, _status_kib(self.proc.pid, "VmHWM") or 0)
            if (_status_kib(self.proc.pid, "VmRSS") or 0) > self.cap:
                self.killed = True
                kill_tree(self.proc.pid)
                return
            time.sleep(0.1)


def kill_tree(pid: int) -> None:
    for p in [pid, *descendants(pid)]:  # Ray's GCS, raylet and workers are the driver's descendants here
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_driver(args: list[str], log: Path, cap_mib: int, timeout: int) -> dict:
    """One stage process under the watchdog: rc, wall, driver peak RSS, and what driver_runner reported."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([PY, RUNNER, *args], stdout=f, stderr=subprocess.STDOUT, env=bench_env(), cwd=REPO,
                                start_new_session=True)
        watch = Watch(proc, cap_mib * 1024)
        watch.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            rc = proc.wait()
            f.write(f"\n[bench] killed after {timeout}s\n")
        watch.join(timeout=5)
    wall = time.perf_counter() - t0
    reported = result_marker_json(log, "DRIVER_RESULT ") or {}
    peak = max(watch.hwm_kib / 1024, reported.get("driver_peak_rss_mib", 0.0))
    out = {"rc": rc, "wall_s": round(wall, 1), "driver_peak_rss_mib": round(peak, 1), "log": str(log),
           "killed_above_cap": watch.killed, **{k: v for k, v in reported.items() if k in ("fit_reached_s",
                                                                                          "num_pairs")}}
    if watch.killed:
        out["note"] = f"killed above cap ({cap_mib} MiB)"
    elif rc != 0:  # the stage's own one-line error, e.g. Arrow's 2 GiB limit on one string array
        errors = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("error:")]
        out["note"] = f"failed (exit {rc}): {errors[-1][:300] if errors else 'see the log'}"
    return out


def stage2(out: Path, cap: int, timeout: int) -> dict:
    r = run_driver(["02_judge/judge.py", "--config", "configs/quickstart/02_judge.yaml", "--set", f"output_dir={out}",
                    "--set", "judge.type=length", "--set", "pairing.valid_fraction=0", "--force"],
                   out / "logs" / "02_judge.log", cap, timeout)
    mf = out / "02_judge" / "manifest.json"
    if r["rc"] == 0 and mf.exists():
        m = json.loads(mf.read_text())
        r.update(manifest_s=m.get("seconds"), judge_s=m.get("stats", {}).get("judge_seconds"),
                 pairs=m.get("rows", {}).get("pairs"))
    return r


def stage3(out: Path, cap: int, timeout: int) -> dict:
    r = run_driver(["--stop-at-fit", "03_dpo_train/train.py", "--config", "configs/quickstart/03_dpo_train.yaml",
                    "--set", f"output_dir={out}", "--force"], out / "logs" / "03_prep.log", cap, timeout)
    if r["rc"] == 0 and "fit_reached_s" not in r:
        r["note"] = "exited 0 without reaching TorchTrainer.fit (reused output?)"
    return r


def rates(r: dict, rows: int, startup: dict | None, seconds_key: str) -> None:
    """rows/s over the stage's time, and net of the start-up run's time."""
    s = r.get(seconds_key)
    if r["rc"] != 0 or not s:
        return
    r["rows_per_s"] = round(rows / s, 1)
    if startup and startup.get(seconds_key) and s > startup[seconds_key]:
        r["rows_per_s_net"] = round(rows / (s - startup[seconds_key]), 1)


def measure(n: int, a, startup: dict | None) -> dict:
    out = Path(a.work) / f"c{label(n)}"
    make_candidates(out, n, a.per_prompt, a.source_bytes, seed=a.seed)
    res = {"candidates": n, "stage2": stage2(out, a.rss_cap_mib, a.timeout)}
    s2 = res["stage2"]
    rates(s2, n, startup and startup["stage2"], "wall_s")
    if s2.get("judge_s"):
        s2["rows_per_s_judge"] = round(n / s2["judge_s"], 1)
    if "3" in a.stages and s2["rc"] == 0:
        s3 = res["stage3"] = stage3(out, a.rss_cap_mib, a.timeout)
        rates(s3, n, startup and startup.get("stage3"), "fit_reached_s")
        if s3.get("num_pairs") and s3.get("fit_reached_s"):
            s3["pairs_per_s"] = round(s3["num_pairs"] / s3["fit_reached_s"], 1)
    elif "3" in a.stages:
        res["stage3"] = {"skipped": "stage 2 did not finish: no pairs to prepare"}
    print(f"[bench] {label(n)}: {json.dumps(res)}", flush=True)
    return res


def grade(small: dict, big: dict, stage: str) -> dict:
    """The issue's two targets for one stage, `big` against `small`."""
    a, b = small.get(stage, {}), big.get(stage, {})
    g: dict = {}
    if b.get("killed_above_cap") or (b.get("rc") not in (0, None) and a.get("driver_peak_rss_mib")):
        why = "killed above cap" if b.get("killed_above_cap") else "failed before the end"
        g["driver_rss_ratio"] = f">= {b['driver_peak_rss_mib'] / a['driver_peak_rss_mib']:.2f} ({why})"
        g["driver_rss"] = "missed"
    elif a.get("driver_peak_rss_mib") and b.get("driver_peak_rss_mib") and b.get("rc") == 0:
        r = b["driver_peak_rss_mib"] / a["driver_peak_rss_mib"]
        g["driver_rss_ratio"] = round(r, 2)
        g["driver_rss"] = "met" if r < TARGETS["driver_rss_growth_max"] else "missed"
    else:
        g["driver_rss"] = "not measured"
    key = "rows_per_s_net" if a.get("rows_per_s_net") and b.get("rows_per_s_net") else "rows_per_s"
    if a.get(key) and b.get(key):
        r = b[key] / a[key]
        g["throughput_ratio"], g["throughput_basis"] = round(r, 2), key
        g["throughput"] = "met" if abs(r - 1) <= TARGETS["throughput_within"] else "missed"
    else:
        g["throughput"] = "missed" if b.get("rc") not in (0, None) else "not measured"
    return g


def table(result: dict) -> None:
    print(f"\n{'size':>6} {'stage':<8} {'rc':>3} {'driver peak MiB':>16} {'wall s':>8} {'rows/s':>9} "
          f"{'net rows/s':>11} {'judge rows/s':>13}  note")
    for r in result["sizes"]:
        for st in ("stage2", "stage3"):
            x = r.get(st)
            if not x or "rc" not in x:
                if x:
                    print(f"{label(r['candidates']):>6} {st:<8} {x.get('skipped', '')}")
                continue
            secs = x.get("fit_reached_s", x["wall_s"]) if st == "stage3" else x["wall_s"]
            print(f"{label(r['candidates']):>6} {st:<8} {x['rc']:>3} {x['driver_peak_rss_mib']:>16} {secs:>8} "
                  f"{x.get('rows_per_s', '-'):>9} {x.get('rows_per_s_net', '-'):>11} "
                  f"{x.get('rows_per_s_judge', '-'):>13}  {x.get('note', '')}")
    for k, g in result["grades"].items():
        print(f"{k}: {json.dumps(g)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--sizes", type=size_arg, default=size_arg("20k,200k"), help="candidate counts: 20k,200k,1m")
    p.add_argument("--stages", default="2,3", help="2 = stage 2; 3 = also stage 3's data preparation")
    p.add_argument("--startup", type=int, default=400, help="candidates of the start-up run (fixed cost); 0 = none")
    p.add_argument("--per-prompt", type=int, default=4)
    p.add_argument("--source-bytes", type=int, default=11_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/judge_scale", help="synthetic inputs (cached) and stage outputs")
    p.add_argument("--rss-cap-mib", type=int, default=12_000, help="kill a run whose driver RSS passes this")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per stage process")
    p.add_argument("--out", help="result JSON (default benchmarks/results/judge-scale-<date>.json)")
    a = p.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    result = {"what": "issue 20: stage 2 (length judge) and stage 3 data preparation (up to TorchTrainer.fit)",
              "commit": commit, "machine": machine(), "loadavg_start": loadavg(), "targets": TARGETS,
              "params": {"per_prompt": a.per_prompt, "source_bytes": a.source_bytes, "seed": a.seed,
                         "rss_cap_mib": a.rss_cap_mib, "stages": a.stages}}
    startup = measure(a.startup, a, None) if a.startup else None
    result["startup"] = startup
    result["sizes"] = [measure(n, a, startup) for n in a.sizes]
    result["loadavg_end"] = loadavg()
    result["grades"] = {}
    small = result["sizes"][0]
    for big in result["sizes"][1:]:
        for st in ("stage2", "stage3"):
            if st in big:
                result["grades"][f"{st} {label(big['candidates'])}/{label(small['candidates'])}"] = grade(
                    small, big, st)
    save(result, a.out, "judge-scale")
    table(result)


if __name__ == "__main__":
    main()
