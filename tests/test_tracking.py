"""Experiment tracking (common.tracking): the TensorBoard and MLflow runs hold what metrics.jsonl holds, read back with
each tool's own reader; `report_to` / LLMForge's `logger` resolve as TRL and LLMForge users write them; the training
curves draw eval rows beside the train rows. No Ray: the tracker functions are called with metrics.jsonl rows."""
import json
import math
from pathlib import Path

import pytest

from common import tracking
from common.config import load_config
from common.errors import UserError
from conftest import REPO

CONFIG = str(REPO / "configs/quickstart/03_dpo_train.yaml")


def metrics_rows(n: int = 6, eval_every: int = 3) -> list[dict]:
    """Rows shaped as common.train_loop writes them (TRL's names), with eval rows as the eval loop adds them."""
    rows = []
    for step in range(1, n + 1):
        loss = math.log(2) - 0.05 * step
        rows.append({"loss": loss, "rewards/chosen": 0.01 * step, "rewards/rejected": -0.01 * step,
                     "rewards/accuracies": min(1.0, 0.25 * step), "rewards/margins": 0.02 * step,
                     "logps/chosen": -40.0 + step, "logps/rejected": -60.0 - step, "logits/chosen": -1.5,
                     "logits/rejected": -1.6, "tokens_per_second_per_worker": 900.0 + step,
                     "ref_wait_seconds": 0.1, "step_seconds": 2.0, "step": step, "total_steps": n, "epoch": 1,
                     "lr": 1e-3, "trainer_pid": 123, "ref_pids": [456], "torch_threads": 2,
                     **({"step0_max_abs_logp_diff": 0.0, "step0_loss": math.log(2)} if step == 1 else {})})
        if step % eval_every == 0:
            rows.append({"step": step, "epoch": 1, "eval/loss": loss + 0.1, "eval/rewards/accuracies": 0.5,
                         "eval/rewards/margins": 0.01 * step})
    return rows


def write_metrics(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def expected(metrics_file: Path) -> dict[str, dict[int, float]]:
    """What every tracker must hold: tag -> {step: value}, from metrics.jsonl through the one naming rule."""
    out: dict[str, dict[int, float]] = {}
    for line in open(metrics_file):
        row = json.loads(line)
        for k, v in tracking.tracker_metrics(row).items():
            out.setdefault(k, {})[row["step"]] = v
    return out


def read_tensorboard(logdir: Path) -> tuple[dict[str, dict[int, float]], list[str]]:
    """Scalars and text tags of every event file under `logdir`, with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer(size_guidance={"scalars": 0, "tensors": 0})
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    scalars: dict[str, dict[int, float]] = {}
    texts: list[str] = []
    for run, tags in mux.Runs().items():
        for tag in tags["scalars"]:
            for e in mux.Scalars(run, tag):
                scalars.setdefault(tag, {})[e.step] = e.value
        texts += [t for t in tags["tensors"]]
    return scalars, texts


def read_mlflow(uri: str, experiment: str) -> tuple[dict[str, dict[int, float]], dict[str, str]]:
    """Metric histories and params of the experiment's one run, with MLflow's client."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    runs = c.search_runs([c.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    run = runs[0]
    metrics = {k: {m.step: m.value for m in c.get_metric_history(run.info.run_id, k)} for k in run.data.metrics}
    return metrics, run.data.params


def assert_same(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]], where: str) -> None:
    assert set(got) == set(want), f"{where}: tags differ: {sorted(set(got) ^ set(want))}"
    for tag, steps in want.items():
        assert set(got[tag]) == set(steps), f"{where}: {tag} steps"
        for step, v in steps.items():
            assert got[tag][step] == pytest.approx(v, rel=1e-6, abs=1e-7), f"{where}: {tag} at step {step}"


def assert_runs_match_metrics(stage_dir: Path, mlflow_uri: str | None = None) -> None:
    """The TensorBoard run under `runs/` and the MLflow run (`mlruns/` unless a URI is given) hold exactly the
    scalars of `metrics.jsonl`, train and eval, at their steps; the resolved config is the MLflow run's params."""
    want = expected(stage_dir / "metrics.jsonl")
    assert "train/loss" in want and "train/rewards/margins" in want and "train/learning_rate" in want
    tb, texts = read_tensorboard(stage_dir / "runs")
    assert_same(tb, want, "tensorboard")
    assert any(t.startswith("config") for t in texts)
    ml, params = read_mlflow(mlflow_uri or (stage_dir / "mlruns").resolve().as_uri(), "03_dpo_train")
    assert_same(ml, want, "mlflow")
    assert params["preference_tuning_config.beta"] and "report_to" in params


@pytest.fixture
def file_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked


def test_tensorboard_and_mlflow_runs_hold_the_metrics_jsonl_rows(tmp_path, file_store):
    metrics = write_metrics(tmp_path / "metrics.jsonl", metrics_rows())
    cfg = load_config("03_dpo_train", CONFIG, [f"output_dir={tmp_path}", "report_to=[tensorboard, mlflow]"])
    work, final = tmp_path / ".work", tmp_path / "out"
    work.mkdir(), final.mkdir()
    plan = tracking.plan(cfg, work, "dpo-test")
    tracking.start(plan, cfg.model_dump(mode="json"))
    for line in open(metrics):  # as the writers of metrics.jsonl do: each row to log_metrics as it is written
        tracking.log_metrics(json.loads(line))
    tracking.finish()
    assert tracking.collect(plan, lambda name: final / name) == ["runs", "mlruns"]
    (final / "metrics.jsonl").write_text(metrics.read_text())
    assert_runs_match_metrics(final)
    assert "eval/loss" in expected(metrics) and "train/trainer_pid" not in expected(metrics)


def test_a_restarted_worker_group_logs_into_the_same_mlflow_run(tmp_path, file_store):
    cfg = load_config("03_dpo_train", CONFIG, [f"output_dir={tmp_path}", "report_to=mlflow"])
    plan = tracking.plan(cfg, tmp_path, "dpo-test")
    rows = metrics_rows(4, eval_every=10)
    for part in (rows[:2], rows[2:]):  # a crash after step 2, then Ray Train restarts the workers
        tracking.start(plan, cfg.model_dump(mode="json"))
        for r in part:
            tracking.log_metrics(r)
        tracking.finish()
    ml, _ = read_mlflow(plan["mlflow"]["tracking_uri"], "03_dpo_train")
    assert sorted(ml["train/loss"]) == [1, 2, 3, 4]


def test_report_to_takes_trl_and_transformers_spellings(tmp_path):
    def report_to(*sets):
        return load_config("03_dpo_train", CONFIG, list(sets)).report_to

    assert report_to() == "none" and tracking.trackers("none") == []  # the quickstart tracks nothing
    assert report_to("report_to=tensorboard") == ["tensorboard"]
    assert report_to("report_to=[mlflow, tensorboard]") == ["mlflow", "tensorboard"]
    assert set(tracking.trackers(report_to("report_to=all"))) >= {"tensorboard", "mlflow"}  # both installed here
    with pytest.raises(UserError, match="unknown tracker 'tensorbord' \\(did you mean 'tensorboard'\\?"):
        report_to("report_to=tensorbord")


def test_llmforge_logger_maps_to_report_to(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    sets = ["logger={provider: mlflow, provider_config: {experiment_name: dpo-migrated, "
            "tracking_uri: 'file:///tmp/x/mlruns'}}"]
    cfg = load_config("03_dpo_train", CONFIG, sets)
    assert cfg.report_to == ["mlflow"]
    plan = tracking.plan(cfg, tmp_path, "dpo-x")
    assert plan["mlflow"]["experiment_name"] == "dpo-migrated" and not plan["mlflow"]["local"]
    cfg = load_config("03_dpo_train", CONFIG, ["report_to=[tensorboard]",
                                               "logger={provider: wandb, provider_config: {project: p, group: g}}"])
    assert cfg.report_to == ["tensorboard", "wandb"]
    monkeypatch.setattr(tracking, "MODULES", {**tracking.MODULES, "wandb": "tensorboardX"})  # as if installed
    w = tracking.plan(cfg, tmp_path, "dpo-x")["wandb"]
    assert w["mode"] == "offline" and w["init"]["project"] == "p" and w["init"]["group"] == "g"
    with pytest.raises(UserError, match=r"unknown mlflow key\(s\) \['artifact_location'\]"):
        load_config("03_dpo_train", CONFIG, ["logger={provider: mlflow, provider_config: {artifact_location: a}}"])


def test_a_missing_tracker_package_is_one_line_with_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "MODULES", {**tracking.MODULES, "mlflow": "no_such_module_here"})
    cfg = load_config("03_dpo_train", CONFIG, ["report_to=[tensorboard, mlflow]"])
    with pytest.raises(UserError) as e:
        tracking.plan(cfg, tmp_path, "dpo-x")
    assert "pip install mlflow-skinny==" in str(e.value) and "\n" not in str(e.value)


def test_training_curves_draw_smoothed_train_and_eval_markers(tmp_path):
    import matplotlib.image

    from common.plots import plot_training_curves, smoothed

    metrics = write_metrics(tmp_path / "metrics.jsonl", metrics_rows(12, eval_every=4))
    png = tmp_path / "training_curves.png"
    plot_training_curves(metrics, png)
    img = matplotlib.image.imread(png)
    # the eval markers' colour (#c44e52) is on the figure: eval rows were drawn, not skipped
    red = ((abs(img[..., 0] - 0xc4 / 255) < 0.02) & (abs(img[..., 1] - 0x4e / 255) < 0.02)).sum()
    assert png.stat().st_size > 1000 and red > 50
    assert smoothed([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull towards 0
    s = smoothed([0.0, float("nan"), 1.0])
    assert s[0] == 0.0 and s[1] == 0.0 and 0 < s[2] < 1
