"""Stage 3: DPO on Ray Train, with the reference model decoupled into its own Ray Data actor pool.

    python 03_dpo_train/train.py --config configs/quickstart/03_dpo_train.yaml
    python 03_dpo_train/train.py --config configs/quickstart/03_dpo_train.yaml --set preference_tuning_config.beta=0.05
    python 03_dpo_train/train.py --config configs/gpu/03_dpo_train.yaml --dry-run   # plan only, no GPU needed

Pipeline: pairs (stage 2, or your own TRL-format `train_path`) -> tokenise (common.tokenize, one function for the
reference and the trainer) -> reference log-probs from a `map_batches` actor pool sized by
`preference_tuning_config.logprob_processor_scaling_config` -> streamed into `num_devices` TorchTrainer workers via
`get_dataset_shard`. Reference log-probs are cached per (reference model, data, tokenisation) fingerprint beside the
pairs, so reruns skip the reference pool. Writes `<output_dir>/03_dpo_train/`: the merged model (`model/`, loads in
transformers and vLLM), the LoRA adapter (`adapter/`), per-step metrics and training curves, manifest.json.
"""
import sys
from pathlib import Path

# torch before Ray: as a `ray job submit` driver, torch loaded after Ray's libraries dies in its MKL loader
# ("Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so", seen with Ray 2.60 / torch 2.13).
import torch  # noqa: E402,F401

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import schema as S  # noqa: E402
from common.config import require_model  # noqa: E402
from common.dpo import (load_pairs, plan, reference_cache, tokenize_pairs, train,  # noqa: E402
                        write_reference_cache)
from common.errors import cli  # noqa: E402
from common.io import StageOutput, read_manifest  # noqa: E402
from common.plots import plot_training_curves  # noqa: E402
from common.ray_setup import check_fits, init_ray, print_plan  # noqa: E402
from common.stage import parse  # noqa: E402

STAGE = "03_dpo_train"


@cli
def main() -> None:
    args, cfg = parse(STAGE, __doc__)
    asks = plan(cfg)
    print_plan(STAGE, asks, cfg.ray)
    if args.dry_run:
        return
    check_fits(STAGE, asks, cfg.ray)
    policy = require_model(cfg.model_id, "model_id")
    ref = require_model(cfg.reference_model_id or cfg.model_id, "reference_model_id")
    upstream = None if cfg.train_path else read_manifest(cfg.input_dir, "02_judge")
    pairs, source = load_pairs(cfg, upstream)
    out = StageOutput(cfg, STAGE, upstream=source, force=args.force,
                      exclude_from_hash=("num_checkpoints_to_keep", "max_failures", "logging_steps"))
    if out.reusable():
        return

    init_ray(cfg.ray)
    tokenized, drops = tokenize_pairs(pairs, cfg, policy, where=args.config)
    cache = reference_cache(cfg, ref, source, upstream)
    result = train(cfg, tokenized, cache, policy, ref, work=out.final.parent / f".{STAGE}.work", force=args.force)

    out.begin()
    final = result.pop("final_dir")
    for name in ("model", "adapter"):
        if (final / name).exists():
            (final / name).rename(out.path(name))
    result["metrics_file"].rename(out.path("metrics.jsonl"))
    cache_hit = cache["hit"]
    if not cache_hit:
        write_reference_cache(cache, result["num_pairs"])
    plot_training_curves(out.path("metrics.jsonl"), out.path("training_curves.png"))
    tokenized.select_columns([S.PAIR_ID]).write_parquet(str(out.data))  # which pairs were trained on
    stats = {"pairs_in": len(pairs), "pairs_trained": result["num_pairs"], "dropped": drops,
             "reference_cache": "hit" if cache_hit else "computed", **result["stats"]}
    manifest = out.commit(
        rows={"pairs_trained": result["num_pairs"]}, stats=stats,
        model=str(out.final / "model"), adapter=str(out.final / "adapter") if cfg.lora_config else None,
        metrics_file=str(out.final / "metrics.jsonl"), curves=str(out.final / "training_curves.png"),
        reference_cache=str(cache["path"]))
    result["cleanup"]()
    f = stats["final_metrics"]
    print(f"[{STAGE}] trained on {result['num_pairs']} pairs ({sum(drops.values())} dropped: {drops}) for "
          f"{cfg.num_epochs} epoch(s), {f.get('step')} steps: final loss {f.get('loss', float('nan')):.4f}, "
          f"reward accuracy {f.get('rewards/accuracies', float('nan')):.2f}, margin "
          f"{f.get('rewards/margins', float('nan')):+.3f}; reference log-probs {stats['reference_cache']}; "
          f"trainer waited {stats['ref_wait_seconds']:.1f}s for reference data in total. "
          f"Model: {manifest['model']}", flush=True)


if __name__ == "__main__":
    main()
