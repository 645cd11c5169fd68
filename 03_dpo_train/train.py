"""Stage 3: DPO on Ray Train, with the reference model decoupled into its own Ray Data actor pool.

    python 03_dpo_train/train.py --config configs/quickstart/03_dpo_train.yaml
    python 03_dpo_train/train.py --config configs/quickstart/03_dpo_train.yaml --set preference_tuning_config.beta=0.05
    python 03_dpo_train/train.py --config configs/gpu/03_dpo_train.yaml --dry-run   # plan only, no GPU needed

Pipeline: pairs (stage 2, or your own TRL-format `train_path`) -> tokenise (common.tokenize, one function for the
reference and the trainer) -> reference log-probs from a `map_batches` actor pool sized by
`preference_tuning_config.logprob_processor_scaling_config` (common.reference) -> streamed into `num_devices`
TorchTrainer workers via `get_dataset_shard` (the worker loop: common.train_loop). Reference log-probs are cached per
(reference model, data, tokenisation) fingerprint beside the pairs, so reruns skip the reference pool; the pool
also stores them as it goes, so a rerun after a crash scores only the pairs it had not reached. Held-out
pairs (`valid_path`, or stage 2's `pairing.valid_fraction` share) get reference log-probs the same way and are
scored at step 0, every `eval_steps` steps and at the end (common.validation: TRL's eval/* metrics). Writes
`<output_dir>/03_dpo_train/`: the merged model (`model/`, loads in transformers and vLLM), the LoRA adapter
(`adapter/`), per-step metrics and training curves, manifest.json.
"""
import shutil
import sys
import uuid
from dataclasses import replace
from pathlib import Path

# torch before Ray: as a `ray job submit` driver, torch loaded after Ray's libraries dies in its MKL loader
# ("Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so", seen with Ray 2.60 / torch 2.13).
import torch  # noqa: E402,F401

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import schema as S  # noqa: E402
from common.config import config_hash, require_model  # noqa: E402
from common.dpo import (check_enough_pairs, gpus_are_auto, load_pairs, load_valid_pairs, plan,  # noqa: E402
                        plan_notes, read_train_result, reference_cache, resolve_gpus, tokenize_pairs,
                        valid_with_reference, with_cached_logps, write_reference_cache)
from common.errors import UserError, cli  # noqa: E402
from common.io import StageOutput, read_manifest  # noqa: E402
from common.model_check import check_lora_targets  # noqa: E402
from common.plots import plot_training_curves  # noqa: E402
from common.progress import follow_training  # noqa: E402
from common.ray_setup import check_fits, init_ray, print_plan  # noqa: E402
from common.reference import ReferenceStore, reference_logps_resumable  # noqa: E402
from common.stage import parse  # noqa: E402
from common.tracking import collect, describe  # noqa: E402
from common.tracking import plan as tracking_plan  # noqa: E402

STAGE = "03_dpo_train"
# How a run is kept and logged, not what it learns: changing them neither redoes the output nor loses checkpoints.
NOT_HASHED = ("num_checkpoints_to_keep", "max_failures", "logging_steps", "report_to", "logger", "eval_steps",
              "eval_batch_size_per_device")


@cli
def main() -> None:
    args, cfg = parse(STAGE, __doc__)
    print_plan(STAGE, plan(cfg), cfg.ray)
    for note in plan_notes(cfg):
        print(f"[{STAGE}]   {note}", flush=True)
    if args.dry_run:
        return
    if gpus_are_auto(cfg):  # as LLMForge: GPUs if the cluster has them, which only the running Ray can say
        init_ray(cfg.ray)
        import ray

        cfg, chosen = resolve_gpus(cfg, ray.cluster_resources().get("GPU", 0))
        print(f"[{STAGE}]   {chosen}", flush=True)
    check_fits(STAGE, plan(cfg), cfg.ray)
    policy = require_model(cfg.model_id, "model_id")
    ref = require_model(cfg.reference_model_id or cfg.model_id, "reference_model_id")
    upstream = None if cfg.train_path else read_manifest(cfg.input_dir, "02_judge")
    pairs, source = load_pairs(cfg, upstream)
    if cfg.lora_config:  # peft would fail in every worker, and Ray Train retry it max_failures times
        check_lora_targets(policy, cfg.lora_config.model_dump(), args.config)
    held_out = load_valid_pairs(cfg, upstream)  # None: no validation
    out = StageOutput(cfg, STAGE, upstream=source, force=args.force, exclude_from_hash=NOT_HASHED)
    if out.reusable():
        return
    run_name = f"dpo-{config_hash(cfg, *NOT_HASHED)}"  # the same name on a rerun: it finds its checkpoints
    track = tracking_plan(cfg, out.work, run_name)  # report_to / logger; a missing package stops us here
    if track["trackers"]:
        print(f"[{STAGE}] report_to {', '.join(track['trackers'])}: runs written under {out.work} while training, "
              f"then moved into the output", flush=True)

    init_ray(cfg.ray)
    # Imported once there is work to do: Ray Train after init_ray's environment, torch not at all for a dry run.
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from common.train_loop import train_loop_per_worker

    tokenized, drops = tokenize_pairs(pairs, cfg, policy, where=args.config)
    num_pairs = tokenized.count()
    check_enough_pairs(num_pairs, cfg, args.config, f" ({sum(drops.values())} of {len(pairs)} dropped: {drops})")

    # Ray Train's checkpoints and the metrics log: a rerun of the same config after a crash resumes from here.
    work = out.work_dir()  # marked as this stage's own; --force starts it over
    for d in ("reference_actors", "trainers"):  # provenance of this run's processes only
        shutil.rmtree(work / d, ignore_errors=True)
    error_file = work / "error.txt"
    error_file.unlink(missing_ok=True)

    # Reference log-probs: the cache if it covers every pair, else the actor pool, streamed into the trainers. The
    # pool stores what it scores as it goes (`store`): after a crash, a rerun reads those pairs back and sends only
    # the others through the pool.
    cache = reference_cache(cfg, ref, source, upstream)
    store = ReferenceStore(cache.store_dir(work), tag=uuid.uuid4().hex[:12])  # the tag: what this run scored
    train_ds, reused = (with_cached_logps(tokenized, cache), num_pairs) if cache.hit else (None, 0)
    if train_ds is None:
        cache = replace(cache, hit=False)
        train_ds, reused = reference_logps_resumable(tokenized, cfg, ref, store,
                                                     provenance_dir=str(work / "reference_actors"))
    # Held-out pairs: tokenised the same way, their reference log-probs computed (or read from their own cache)
    # before training, since they are few; every worker gets all of them (common.validation).
    datasets, valid_stats, valid_cache = {"train": train_ds}, {}, None
    if held_out is not None:
        valid_tok, valid_drops = tokenize_pairs(held_out[0], cfg, policy, where=held_out[1]["dir"])
        valid_cache = reference_cache(cfg, ref, held_out[1], upstream)
        datasets["valid"], hit = valid_with_reference(valid_tok, cfg, ref, valid_cache,
                                                      provenance_dir=str(work / "reference_actors"))
        valid_stats = {"valid_pairs": datasets["valid"].count(), "valid_dropped": valid_drops,
                       "valid_reference_cache": hit}

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            # deepspeed: already turned into strategy + sharding; the workers need not read its JSON again
            "cfg": cfg.model_copy(update={"model_id": policy, "deepspeed": None}).model_dump(mode="json"),
            "num_pairs": num_pairs,
            "metrics_file": str(work / "metrics.jsonl"), "error_file": str(error_file),
            "provenance_dir": str(work / "trainers"),
            "tracking": track,
            "has_valid": "valid" in datasets,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_devices, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.num_cpus_per_worker, **cfg.worker_resources}),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(work / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=cfg.max_failures)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),  # each worker takes its slice of `valid` itself
    )
    same_model = cfg.reference_model_id in (None, cfg.model_id)  # then step 0 must agree
    with follow_training(work / "metrics.jsonl", cfg.preference_tuning_config.step0_tolerance if same_model else None):
        fit = trainer.fit()  # the driver shows the workers' progress from metrics.jsonl
    if error_file.exists():  # a worker stopped on bad input (a non-finite loss): retrying would not help
        raise UserError(f"{STAGE}: {error_file.read_text()}")
    if fit.error:
        raise fit.error
    result = read_train_result(work, Path(fit.checkpoint.path), num_pairs, cfg.logging_steps)

    out.begin()
    for name in ("model", "adapter"):
        if (result.final_dir / name).exists():
            (result.final_dir / name).rename(out.path(name))
    result.metrics_file.rename(out.path("metrics.jsonl"))
    collect(track, out.path)  # TensorBoard / MLflow / W&B runs, beside the metrics they hold
    if not cache.hit:
        write_reference_cache(cache, store, num_pairs)
    plot_training_curves(out.path("metrics.jsonl"), out.path("training_curves.png"))
    tokenized.select_columns([S.PAIR_ID]).write_parquet(str(out.data))  # which pairs were trained on
    stats = {"pairs_in": len(pairs), "pairs_trained": num_pairs, "dropped": drops,
             "reference_cache": "hit" if cache.hit else "computed",
             # scored by the pool in this run / read back from a crashed run's store or the cache
             "reference_rows_computed": store.rows_written(store.tag), "reference_rows_reused": reused,
             **valid_stats, **result.stats}
    manifest = out.commit(
        rows={"pairs_trained": num_pairs}, stats=stats,
        model=str(out.final / "model"), adapter=str(out.final / "adapter") if cfg.lora_config else None,
        metrics_file=str(out.final / "metrics.jsonl"), curves=str(out.final / "training_curves.png"),
        reference_cache=str(cache.path), report_to=track["trackers"],
        valid_reference_cache=str(valid_cache.path) if valid_cache else None)
    shutil.rmtree(work, ignore_errors=True)  # the output is complete: its checkpoints are no longer needed
    f = stats["final_metrics"]
    print(f"[{STAGE}] trained on {num_pairs} pairs ({sum(drops.values())} dropped: {drops}) for "
          f"{cfg.num_epochs} epoch(s), {f.get('step')} steps: final loss {f.get('loss', float('nan')):.4f}, "
          f"reward accuracy {f.get('rewards/accuracies', float('nan')):.2f}, margin "
          f"{f.get('rewards/margins', float('nan')):+.3f}; reference log-probs {stats['reference_cache']}; "
          f"trainer waited {stats['ref_wait_seconds']:.1f}s for reference data in total. {eval_summary(stats)}"
          f"Model: {manifest['model']}", flush=True)
    for line in describe(track, out.final):
        print(f"[{STAGE}] {line}", flush=True)


def eval_summary(stats: dict) -> str:
    """The held-out loss at the first and last evaluation, for the closing line ("" without validation)."""
    first, last = stats["first_eval"], stats["final_eval"]
    if not last:
        return ""
    return (f"Eval on {last['eval/num_pairs']} held-out pairs: loss {first['eval/loss']:.4f} at step "
            f"{first['step']} -> {last['eval/loss']:.4f} at step {last['step']}, reward accuracy "
            f"{last['eval/rewards/accuracies']:.2f}. ")


if __name__ == "__main__":
    main()
