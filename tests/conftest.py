"""Shared test set-up: the repo root on sys.path, offline hub, and one local Ray per test session."""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

MODEL = REPO / "models" / "smollm2-135m-instruct"
EMBEDDER = REPO / "models" / "all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def model_path() -> str:
    if not (MODEL / "config.json").exists():
        pytest.fail("models/ not prepared: run `bash scripts/setup.sh` (the README test command does)")
    return str(MODEL)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the in-process tests, with the custom resources GPU configs ask for."""
    from common.config import RayConfig
    from common.ray_setup import init_ray

    import ray

    init_ray(RayConfig())
    yield ray
    ray.shutdown()


def run_stage(script: str, config: str, *sets: str, force: bool = False, timeout: int = 900):
    """Run a stage script as a user would (its own process and Ray), returning the CompletedProcess."""
    import subprocess

    cmd = [sys.executable, str(REPO / script), "--config", str(config)]
    for s in sets:
        cmd += ["--set", s]
    if force:
        cmd.append("--force")
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
