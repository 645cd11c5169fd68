"""Run a stage script as its driver process and report that process's own peak RSS when it exits (issue 20).

    .venv/bin/python benchmarks/driver_runner.py 02_judge/judge.py --config ... --set ...
    .venv/bin/python benchmarks/driver_runner.py --stop-at-fit 03_dpo_train/train.py --config ... --set ...

The script runs in this process (runpy, as `__main__`), so the `VmHWM` of /proc/self/status at exit is the driver's
peak RSS alone: Ray's workers, raylet and GCS are other processes and are not counted. Not `ru_maxrss`: Linux
carries it across fork and exec, so a child of a large process (pytest, the benchmark) starts at its parent's RSS.
Printed on stdout as `DRIVER_RESULT {json}` (also when the script fails or exits with an error code).

`--stop-at-fit` ends stage 3 where its trainers would start: `ray.train.torch.TorchTrainer.fit` is replaced (once
Ray is up, by wrapping common.ray_setup.init_ray, so Ray Train is still imported after init_ray as train.py wants)
with a function that records the time and exits 0. Everything train.py does before training runs as usual: reading
the pairs, tokenising them (materialised), the reference-cache lookup, building the lazy reference pipeline.
"""
from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
T0 = time.time()
RESULT: dict = {}


def peak_rss_mib() -> float:
    """This process's peak RSS (the kernel's high-water mark of its memory since exec)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return round(kib / 1024, 1)


def _report() -> None:
    RESULT.update(driver_peak_rss_mib=peak_rss_mib(), wall_s=round(time.time() - T0, 2), pid=os.getpid())
    print("DRIVER_RESULT " + json.dumps(RESULT), flush=True)


def _stop_at_fit() -> None:
    import common.ray_setup as rs

    real = rs.init_ray

    def init_then_patch(*args, **kwargs):
        out = real(*args, **kwargs)
        from ray.train.torch import TorchTrainer

        def fit(self):
            cfg = getattr(self, "train_loop_config", None) or {}
            RESULT.update(fit_reached_s=round(time.time() - T0, 2), num_pairs=cfg.get("num_pairs"))
            raise SystemExit(0)  # not an Exception: the stage's @cli wrapper lets it through

        TorchTrainer.fit = fit
        return out

    rs.init_ray = init_then_patch


def main() -> None:
    args = sys.argv[1:]
    stop = args[:1] == ["--stop-at-fit"]
    if stop:
        args = args[1:]
    if not args:
        sys.exit("usage: driver_runner.py [--stop-at-fit] SCRIPT [ARGS...]")
    sys.path.insert(0, str(REPO))
    atexit.register(_report)  # registered first: runs after Ray's own atexit shutdown
    if stop:
        _stop_at_fit()
    script = str(Path(args[0]) if Path(args[0]).is_absolute() else REPO / args[0])
    sys.argv = [script, *args[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
