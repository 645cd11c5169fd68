"""Ray start-up that lets one config run on a 2-core laptop and on a GPU cluster.

Locally we start Ray with the `accelerator_type:*` custom resources declared (see `RayConfig.local_resources`), so a
config that asks for A10G reference workers schedules those actors for real, through the same custom resource.
On a cluster (`ray.address: auto`, what `ray job submit` gives) the cluster's own resources apply.

Two cores deadlock silently when actors hold every CPU while a read task waits for one, so every stage prints its
resource plan and `check_fits` refuses, before anything starts, a plan whose minimum does not fit.

Output: by default the terminal shows our own lines and, in a terminal, one progress bar per long step. The workers'
output (vLLM, torch, Ray Train, Ray Data's actors) is not forwarded to the driver (`log_to_driver=False`): it stays in
Ray's log files under /tmp/ray/session_latest/logs. `--verbose` (common.stage) forwards it and restores the libraries'
INFO levels. Not in a terminal (CI, `| tee`, a file), nothing draws: no progress bars, no cursor control.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from common.config import REPO, RayConfig
from common.errors import UserError

# Set before Ray or vLLM is imported anywhere: no hub at run time here, no token prompt from Ray.
LOCAL_ENV = {
    "HF_HUB_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CONFIGURE_LOGGING": "1",
    # Ray Train v2 patches print() in its workers to write to stdout AND to a logger whose handler writes to
    # stderr (a Ray worker's sys.stdout is never sys.__stdout__), so every forwarded line arrived twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # A loaded 2-core machine can take longer than Ray's default to register its raylet.
    "RAY_raylet_start_wait_time_s": "120",
}
# Log levels of the libraries, quiet (default) and --verbose. In the workers they only decide what Ray's log files
# keep (nothing is forwarded unless --verbose); on the driver they decide what the terminal shows.
LEVELS = {
    False: {"RAY_LOGGER_LEVEL": "warning", "VLLM_LOGGING_LEVEL": "WARNING", "TRANSFORMERS_VERBOSITY": "error",
            "HF_DATASETS_VERBOSITY": "error"},
    True: {"RAY_LOGGER_LEVEL": "info", "VLLM_LOGGING_LEVEL": "INFO", "TRANSFORMERS_VERBOSITY": "info",
           "HF_DATASETS_VERBOSITY": "info"},
}
_verbose = False


def configure_output(verbose: bool) -> None:
    """Called by every stage's command line before Ray, vLLM or transformers is imported (they read these once).
    A level the user set in the environment wins."""
    global _verbose
    _verbose = verbose
    for k, v in LEVELS[verbose].items():
        os.environ.setdefault(k, v)


def verbose() -> bool:
    return _verbose


def interactive() -> bool:
    """Progress bars only when a person watches both streams; `| tee`, CI and log files get plain lines."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def set_local_env(cfg: RayConfig) -> None:
    for k, v in {**LOCAL_ENV, **LEVELS[_verbose]}.items():
        if k == "HF_HUB_OFFLINE" and cfg.address:
            continue  # a cluster may download hub models
        os.environ.setdefault(k, v)


@dataclass
class Ask:
    """One kind of Ray worker a stage will start: `count` of them, each asking for `resources`."""

    what: str
    count: int
    resources: dict[str, float] = field(default_factory=dict)


def print_plan(stage: str, asks: list[Ask], cfg: RayConfig) -> None:
    where = f"the cluster at {cfg.address}" if cfg.address else "a local Ray"
    print(f"[{stage}] resource plan on {where}:", flush=True)
    for a in asks:
        res = ", ".join(f"{k}: {v:g}" for k, v in a.resources.items()) or "-"
        print(f"[{stage}]   {a.count:>3} x {a.what:<38} {{{res}}}", flush=True)  # tagged: no line repeats


def check_fits(stage: str, asks: list[Ask], cfg: RayConfig) -> None:
    """Locally, the minimum of every pool plus one read task must fit, or Ray waits forever."""
    if cfg.address:
        return
    cpus = cfg.num_cpus or os.cpu_count() or 1
    need = sum(a.count * a.resources.get("CPU", 0) for a in asks)
    if need > cpus:
        raise UserError(f"{stage}: the resource plan needs {need:g} CPUs at once but the local Ray has {cpus:g}; "
                        f"lower num_cpus / concurrency / num_devices in the config (a read task needs a share too)")
    for a in asks:
        for k, v in a.resources.items():
            if k in ("CPU", "GPU", "memory"):
                if k == "GPU" and v > 0:
                    raise UserError(f"{stage}: {a.what} asks for {v:g} GPU but this machine has none; "
                                    f"use a configs/quickstart/ config, or --dry-run to check a GPU config")
                continue
            have = cfg.local_resources.get(k, 0)
            if a.count * v > have:
                raise UserError(f"{stage}: {a.what} asks for custom resource {k} ({a.count} x {v:g}) but the "
                                f"local Ray declares {have:g}; add it to ray.local_resources")


def init_ray(cfg: RayConfig, extra_env: dict[str, str] | None = None) -> None:
    set_local_env(cfg)
    import ray

    use_shuffle(cfg.shuffle)
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in [*LOCAL_ENV, *LEVELS[_verbose]] if k in os.environ}
    # Workers import `common` from the repo; on a cluster `ray job submit --working-dir .` ships it instead.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.update(cfg.env_vars)
    env.update(extra_env or {})
    level = logging.INFO if _verbose else logging.WARNING
    common = dict(runtime_env={"env_vars": env}, log_to_driver=_verbose, logging_level=level)
    if cfg.address:
        ray.init(address=cfg.address, **common)
    else:
        ray.init(num_cpus=cfg.num_cpus, resources=dict(cfg.local_resources), include_dashboard=False, **common)
    quiet_driver(ray)


def off_driver(fn, *args):
    """fn(*args) in a Ray task, its result back: for a step that reads a whole set of files (the reference store's
    parts), which on a cluster should load a worker, not the driver (one modest process). A fraction of a CPU, so
    it also runs beside actors that hold the rest. The files must be where the task runs: output_dir is shared."""
    import ray

    return ray.get(ray.remote(num_cpus=0.25, max_retries=0)(_call).remote(fn, *args))


def _call(fn, *args):
    return fn(*args)  # a task of its own, so `fn` may be any picklable callable (a bound method too)


def use_shuffle(kind: str) -> None:
    """Ray Data's shuffle strategy for this driver's groupbys and sorts (RayConfig.shuffle). Ray Data's default
    starts aggregator actors for each groupby, seconds each on 2 cores, and they take CPU shares beside the stage's
    own actors; the sort shuffle runs as tasks."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    if kind == "sort":
        ray.data.DataContext.get_current().shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED


def quiet_driver(ray) -> None:
    """Ray Data's bars only in a terminal, one per dataset (its per-operator bars with --verbose); its INFO lines,
    and library warnings on the driver, go to Ray's log files only (unless --verbose)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = interactive()
    ctx.enable_operator_progress_bars = _verbose
    if _verbose:
        return
    for h in logging.getLogger("ray.data").handlers:  # its console handler; the file handler keeps everything
        if type(h).__name__ == "PlainRayHandler":
            h.setLevel(logging.ERROR)
    # To a file in the session's logs: Python warnings (e.g. Ray Data's "use expr instead of fn"), and ray.llm's
    # loggers, which print INFO lines to the console unless their parent "ray.llm" already has a handler.
    to_file = logging.FileHandler(session_log("driver.log"))
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
    logging.captureWarnings(True)
    for name, level in (("py.warnings", logging.WARNING), ("ray.llm", logging.INFO)):
        lg = logging.getLogger(name)
        lg.handlers, lg.propagate = [to_file], False
        lg.setLevel(level)


def session_log(name: str) -> str:
    """A file in this Ray session's log folder (/tmp/ray/session_latest/logs locally)."""
    import ray

    return os.path.join(ray._private.worker._global_node.get_logs_dir_path(), name)
