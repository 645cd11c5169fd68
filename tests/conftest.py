"""Shared test set-up: the repo root on sys.path, offline hub, the test extras checked, a local Ray per module, and
`run_stage` to run a stage script as a user would."""
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


def tiny_model(path: Path) -> Path:
    """SmolLM2's config with 2 layers of width 64 (tied embeddings, its 49k vocabulary, its tokenizer), random
    weights, fp32: for tests about how the parameters are laid out or averaged, not about their values."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(MODEL)
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16, "dtype": "float32"})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    AutoTokenizer.from_pretrained(MODEL).save_pretrained(path)
    return path


def pytest_configure(config):
    """A test extra that is missing (or at another version than pinned) stops the run here, loudly: a test that
    skipped on it instead would pass CI without testing anything."""
    from importlib import metadata

    from packaging.requirements import Requirement

    bad = []
    for line in (REPO / "requirements-test.txt").read_text().splitlines():
        if not line.split("#")[0].strip():
            continue
        req = Requirement(line.split("#")[0])
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            version = None
        if version is None or not req.specifier.contains(version, prereleases=True):
            bad.append(f"{req} ({f'installed: {version}' if version else 'not installed'})")
    if bad:
        raise pytest.UsageError(f"test dependencies: {', '.join(bad)}; run `bash scripts/test.sh` (it installs "
                                f"requirements-test.txt)")


@pytest.fixture(scope="session")
def model_path() -> str:
    if not (MODEL / "config.json").exists():
        pytest.fail("models/ not prepared: run `bash scripts/setup.sh` (the README test command does)")
    return str(MODEL)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for a module's in-process tests, with the custom resources GPU configs ask for. Module-scoped:
    shut down before other modules start stage subprocesses, whose Ray would otherwise not be the only one here."""
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


def one_line_error(proc) -> str:
    """A user error: exit 2 and exactly one `error:` line, with no traceback from our process. (Ray workers' own
    log lines, prefixed `(ActorName pid=...)`, are Ray's and are left out of the traceback check.)"""
    import re

    assert proc.returncode == 2, proc.stderr[-3000:]
    ours = [ln for ln in proc.stderr.splitlines() if not re.match(r"^\s*(\x1b\[[0-9;]*m)*\(", ln)]
    assert not any("Traceback" in ln for ln in ours), proc.stderr[-3000:]
    errors = [ln for ln in ours if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]
