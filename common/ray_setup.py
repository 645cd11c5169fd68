"""Ray start-up that lets one config run on a 2-core laptop and on a GPU cluster.

Locally we start Ray with the `accelerator_type:*` custom resources declared (see `RayConfig.local_resources`), so a
config that asks for A10G reference workers schedules those actors for real, through the same custom resource.
On a cluster (`ray.address: auto`, what `ray job submit` gives) the cluster's own resources apply.

Two cores deadlock silently when actors hold every CPU while a read task waits for one, so every stage prints its
resource plan and `check_fits` refuses, before anything starts, a plan whose minimum does not fit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from common.config import REPO, RayConfig
from common.errors import UserError

# Set before Ray or vLLM is imported anywhere: no hub at run time here, no token prompt from Ray.
LOCAL_ENV = {
    "HF_HUB_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "VLLM_CONFIGURE_LOGGING": "1",
    # A loaded 2-core machine can take longer than Ray's default to register its raylet.
    "RAY_raylet_start_wait_time_s": "120",
}


def set_local_env(cfg: RayConfig) -> None:
    for k, v in LOCAL_ENV.items():
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
        print(f"    {a.count:>3} x {a.what:<38} {{{res}}}", flush=True)


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

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in LOCAL_ENV if k in os.environ}
    # Workers import `common` from the repo; on a cluster `ray job submit --working-dir .` ships it instead.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.update(cfg.env_vars)
    env.update(extra_env or {})
    if cfg.address:
        ray.init(address=cfg.address, runtime_env={"env_vars": env})
    else:
        ray.init(num_cpus=cfg.num_cpus, resources=dict(cfg.local_resources), include_dashboard=False,
                 runtime_env={"env_vars": env}, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
