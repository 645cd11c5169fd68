"""Experiment tracking as TRL users know it: `report_to` tensorboard / mlflow / wandb (LLMForge's `logger` joins it).

The driver resolves where each tracker writes (`plan`, before Ray starts: a missing package is one `error:` line
with its pip command); rank 0 opens the trackers (`start`), and whoever appends a row to metrics.jsonl hands the same
row to `log_metrics`, so train and eval rows reach every tracker with the step they carry. Names follow transformers'
TensorBoard/W&B callbacks on TRL's logs: train metrics as `train/<TRL name>` (`train/loss`, `train/rewards/margins`,
`train/learning_rate`), eval rows' keys as written (`eval/loss`). The resolved config is the run's parameters.

By default runs land beside metrics.jsonl: written into the stage's work folder while training (point TensorBoard
there to watch live), moved into the output with it (`collect`). MLFLOW_TRACKING_URI (or the logger's
`tracking_uri`) sends MLflow runs to that server instead; wandb runs offline unless WANDB_MODE says otherwise.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from common.errors import UserError

TRACKERS = ("tensorboard", "mlflow", "wandb")
MODULES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}  # what each tracker imports
PIP = {"tensorboard": "tensorboardX==2.6.5", "mlflow": "mlflow-skinny==3.17.2", "wandb": "wandb==0.31.0"}
FOLDERS = {"tensorboard": "runs", "mlflow": "mlruns", "wandb": "wandb"}  # under the stage's output
MLFLOW_KEYS = {"tracking_uri", "experiment_name", "run_name", "tags", "create_experiment_if_not_exists"}
# Fields of a metrics.jsonl row that describe the process, not the training: kept out of the trackers.
NOT_METRICS = {"step", "total_steps", "trainer_pid", "ref_pids", "torch_threads", "resumed_from_step"}
RENAMED = {"lr": "learning_rate"}  # our row's name -> TRL's (transformers' Trainer logs `learning_rate`)

_active: list = []  # the trackers `start` opened in this process (rank 0 only)


# ------------------------------------------------------------------------------------------------ names
def tracker_metrics(row: dict) -> dict[str, float]:
    """The scalars of one metrics.jsonl row under the trackers' names (see the module docstring)."""
    out = {}
    for k, v in row.items():
        if k in NOT_METRICS or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[k if k.startswith("eval/") else f"train/{RENAMED.get(k, k)}"] = float(v)
    return out


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as `a.b.c` -> value strings (MLflow params; TensorBoard shows the same as a table)."""
    if isinstance(node, dict) and node:
        return {k: v for key, sub in node.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node if isinstance(node, str) else json.dumps(node)}


# ------------------------------------------------------------------------------------------------ driver
def check_logger(provider: str, provider_config: dict) -> None:
    """LLMForge's `logger.provider_config`: wandb's goes to `wandb.init` as is; mlflow's must be keys we honour."""
    if provider == "mlflow":
        bad = sorted(set(provider_config) - MLFLOW_KEYS)
        if bad:
            raise ValueError(f"logger.provider_config: unknown mlflow key(s) {bad}; keys are {sorted(MLFLOW_KEYS)} "
                             f"(or set MLFLOW_TRACKING_URI)")


def trackers(report_to: str | list[str], required: tuple[str, ...] = ()) -> list[str]:
    """`report_to` as a list: "none" -> [], "all" -> every tracker installed (transformers' rule) plus `required`."""
    if report_to == "none":
        return []
    if report_to == "all":
        return [t for t in TRACKERS if t in required or importlib.util.find_spec(MODULES[t]) is not None]
    return list(dict.fromkeys(report_to))


def plan(cfg, work: Path, run_name: str) -> dict:
    """Where each requested tracker writes, as JSON for the workers. Raises UserError (one line, before Ray starts)
    if a tracker's package is missing."""
    logger = cfg.logger
    names = trackers(cfg.report_to, (logger.provider,) if logger else ())
    missing = [t for t in names if importlib.util.find_spec(MODULES[t]) is None]
    if missing:
        raise UserError(f"report_to: {', '.join(missing)} asked for but not installed; pip install "
                        f"{' '.join(PIP[t] for t in missing)} (or drop it from report_to / logger)")
    own = {t: dict(logger.provider_config) for t in names if logger and logger.provider == t}
    out: dict[str, Any] = {"trackers": names, "work": str(work), "run_name": run_name}
    if "tensorboard" in names:
        out["tensorboard"] = {"logdir": str(work / FOLDERS["tensorboard"] / run_name)}
    if "mlflow" in names:
        m = own.get("mlflow", {})
        uri = m.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        out["mlflow"] = {"tracking_uri": uri or (work / FOLDERS["mlflow"]).resolve().as_uri(), "local": not uri, "experiment_name": m.get("experiment_name") or "03_dpo_train",
                         "run_name": m.get("run_name") or run_name, "tags": dict(m.get("tags") or {})}
    if "wandb" in names:
        init = {"project": "dpo-cookbook", "name": run_name, **own.get("wandb", {})}
        out["wandb"] = {"mode": os.environ.get("WANDB_MODE", "offline"), "dir": str(work), "init": init}
    return out


def describe(p: dict, final: Path) -> list[str]:
    """One line per tracker: where its run will be once the stage completes, and how to open it."""
    lines = []
    if "tensorboard" in p:
        lines.append(f"TensorBoard: tensorboard --logdir {final / FOLDERS['tensorboard']}")
    if "mlflow" in p:
        m = p["mlflow"]
        lines.append(f"MLflow: mlflow ui --backend-store-uri {final / FOLDERS['mlflow']}" if m["local"] else
                     f"MLflow: experiment {m['experiment_name']!r} at {m['tracking_uri']}")
    if "wandb" in p:
        lines.append(f"W&B ({p['wandb']['mode']}): {final / FOLDERS['wandb']}" +
                     (f" (wandb sync {final / FOLDERS['wandb']}/offline-run-*)" if p["wandb"]["mode"] == "offline"
                      else ""))
    return lines


def collect(p: dict, dest) -> list[str]:
    """Move the runs written under the work folder into the output (`dest(name)`: the output's path for a name)."""
    moved = []
    for t in p.get("trackers", ()):
        src = Path(p["work"]) / FOLDERS[t]
        if src.exists():
            shutil.move(str(src), str(dest(FOLDERS[t])))
            moved.append(FOLDERS[t])
    return moved


# ------------------------------------------------------------------------------------------------ rank 0
def start(p: dict | None, params: dict) -> None:
    """Open every tracker of the plan, `params` (the resolved config) as the run's parameters. A restarted worker
    group resumes the same MLflow / W&B run (its id is kept in the work folder) and adds a TensorBoard event file."""
    finish()
    for t in (p or {}).get("trackers", ()):
        _active.append({"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}[t](p, params))


def log_metrics(row: dict) -> None:
    """Hand one metrics.jsonl row (train or eval) to every open tracker, at the row's `step`. No tracker: no-op."""
    if not _active:
        return
    metrics = tracker_metrics(row)
    for t in _active:
        t.log(metrics, int(row.get("step", 0)))


def finish() -> None:
    while _active:
        _active.pop().close()


def _run_id_file(p: dict, tracker: str) -> Path:
    return Path(p["work"]) / f"{tracker}_run_id"


class _TensorBoard:
    def __init__(self, p: dict, params: dict):
        from tensorboardX import SummaryWriter

        self.w = SummaryWriter(p["tensorboard"]["logdir"])
        table = "\n".join(f"| {k} | {v} |" for k, v in flatten(params).items())
        self.w.add_text("config", "| key | value |\n| --- | --- |\n" + table, 0)  # markdown table, TEXT tab

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()  # a run watched live, or cut short, shows every logged step

    def close(self) -> None:
        self.w.close()


class _MLflow:
    def __init__(self, p: dict, params: dict):
        m = p["mlflow"]
        if m["local"]:  # MLflow 3 refuses its file store unless asked; a folder is what works offline, no server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.c = MlflowClient(tracking_uri=m["tracking_uri"])
        ids = _run_id_file(p, "mlflow")
        if ids.exists():
            self.run = ids.read_text().strip()
            return
        exp = self.c.get_experiment_by_name(m["experiment_name"])
        exp_id = exp.experiment_id if exp else self.c.create_experiment(m["experiment_name"])
        self.run = self.c.create_run(exp_id, run_name=m["run_name"], tags=m["tags"]).info.run_id
        ids.write_text(self.run)
        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.c.log_batch(self.run, params=items[i:i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.c.log_batch(self.run, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.c.set_terminated(self.run)


class _Wandb:
    def __init__(self, p: dict, params: dict):
        import wandb

        w, ids = p["wandb"], _run_id_file(p, "wandb")
        run_id = ids.read_text().strip() if ids.exists() else wandb.util.generate_id()
        ids.write_text(run_id)
        self.run = wandb.init(**{**w["init"], "id": run_id, "resume": "allow", "mode": w["mode"],
                                 "dir": w["dir"], "config": params})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()
