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
# The shared stage-1 run (`stage1_run`): ACLSum abstracts x candidates, short answers.
STAGE1_PROMPTS, STAGE1_CANDIDATES, STAGE1_MAX_TOKENS = 8, 4, 48


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


@pytest.fixture(scope="session")
def stage1_run(tmp_path_factory, model_path):
    """One real stage-1 run (the quickstart config, real vLLM, STAGE1_* sizes) for the whole session: a vLLM run
    costs a minute or more, and the tests of stages 2 to 4, the pipeline chain and the log check all start from one.
    Returns (output_dir, the CompletedProcess). The chain (tests/test_pipeline.py) writes its later stages into this
    output_dir; every other test takes a copy of `01_generate` (`copy_stage1`) and writes beside the copy."""
    out = tmp_path_factory.mktemp("stage1")
    proc = run_stage("01_generate/generate.py", REPO / "configs" / "quickstart" / "01_generate.yaml",
                     f"output_dir={out}", f"data.limit={STAGE1_PROMPTS}", f"sampling.n={STAGE1_CANDIDATES}",
                     f"sampling.max_tokens={STAGE1_MAX_TOKENS}", timeout=1800)  # shared CI runners are slow
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, proc


def copy_stage1(stage1_run, dest: Path) -> Path:
    """The shared stage-1 output copied into `dest` (an output_dir of its own): a stage run there reads it through
    its default input_dir. Its manifest's paths are relative to the output_dir, so the copy is complete as is."""
    import shutil

    shutil.copytree(stage1_run[0] / "01_generate", dest / "01_generate")
    return dest


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


def training_progress(work: Path) -> tuple[dict, int]:
    """Stage 3's progress as seen from outside, in `work` (its `.03_dpo_train.work/`): the last row metrics.jsonl
    logged (`{"step": 0}` before the first) and the step of the last checkpoint Ray Train's controller has
    registered (0: none yet). A checkpoint
    a worker has reported is not yet one a restart resumes from: the controller picks reports up as it polls, and
    a worker killed before that loses it. Tests that kill a run wait for both, or race the poll."""
    import json

    def text(path: Path) -> str:
        return path.read_text() if path.exists() else ""

    rows = [json.loads(ln) for ln in text(work / "metrics.jsonl").split("\n")[:-1]]  # lines written whole
    steps = [0]
    for snapshot in (work / "ray").glob("*/checkpoint_manager_snapshot.json"):
        try:  # Ray writes it in place: it may be caught mid-write
            steps.append(json.loads(text(snapshot))["latest_checkpoint_result"]["metrics"]["step"])
        except (ValueError, KeyError, TypeError):
            pass
    return (rows[-1] if rows else {"step": 0}), max(steps)
