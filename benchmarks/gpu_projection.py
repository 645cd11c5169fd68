"""Stage 3's GPU run (configs/gpu/) on paper: FLOPs per pair, pool supply vs trainer demand, wall time, GPU-hours, $.

    .venv/bin/python benchmarks/gpu_projection.py                       # configs/gpu/03_dpo_train.yaml, defaults below
    .venv/bin/python benchmarks/gpu_projection.py --mfu 0.3 --a10g-price 0.5 --pairs 20000

Three ways to get the reference log-probs for the same trainers, same pairs, same epochs:
  ours            the reference pool (the config's actors, e.g. A10G) streams log-probs to the trainers during epoch 1;
                  later epochs reuse them (03_dpo_train keeps epoch 1's rows), so the pool is billed for epoch 1 only.
  TRL inline      DPOTrainer's default: every step also runs the reference forward on the trainers, every epoch.
  TRL precompute  precompute_ref_log_probs=True: one reference pass over the pairs on the trainers before training.
Everything is FLOPs at an assumed utilisation of each GPU's nominal bf16 TFLOPS (common.capacity); pipeline fill,
start-up, checkpoints, evaluation, attention FLOPs (~2% at these lengths) and communication are left out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.capacity import NOMINAL_TFLOPS, accelerator, pool_balance, step_cost  # noqa: E402
from common.config import load_config, resolve  # noqa: E402

# Mistral-7B-Instruct-v0.1 has 7,241,732,096 parameters (its safetensors; "7.24B params" on the model page).
PARAMS = 7.24e9
# The example this recipe replaces (anyscale/templates, fine-tune-preference/configs/mistral_dpo_summarization.yaml):
# "10k examples for training with an average of 2.2k tokens per sample". A sample is read as both sequences the
# model runs, prompt+chosen and prompt+rejected: a CNN/DailyMail article is ~1k tokens (the dataset's test split is
# 49.9 MB over 11,490 rows, ~4.3 kB a row) and a summary ~100. Reading it as 2.2k per sequence doubles every time
# and cost below and changes no ratio.
PAIRS, TOKENS_PER_PAIR = 10_000, 2_200
# Model FLOPs utilisation, one value for every GPU. The example's own report (about 1 hour on 8 A100s: 6 trainers and
# 2 reference actors in its configs/dpo-training/mistral_a100.yaml, 3 epochs) implies ~43% with the numbers above
# (printed as a cross-check); PaLM reports 46% (Chowdhery et al. 2022), Megatron-LM 52% on A100s
# (Narayanan et al. 2021). A LoRA fine-tune of a 7B model at batch 2 is not better tuned than those, so 40%.
MFU = 0.40
EXAMPLE_A100_TRAINERS, EXAMPLE_EPOCHS, EXAMPLE_HOURS = 6, 3, 1.0
# On-demand list prices per GPU-hour, AWS us-east-1, Linux, from instances.vantage.sh's price data as of 2026-01-21
# (snapshot: github.com/tsaol/aws-gpu, data/all_gpu_instances.js):
# p4d.24xlarge $21.957642/h for 8 A100-40GB (after AWS's June 2025 P4 price cut); g5.2xlarge $1.212/h for one A10G
# (8 vCPUs, 32 GiB: room for a reference actor's 4 CPUs and the 14.5 GB of bf16 weights while loading; g5.xlarge,
# $1.006, has 16 GiB). List prices vary by region and date; spot, reserved and negotiated prices are lower.
PRICES = {"A100": 21.957642 / 8, "A10G": 1.212}


def run_shape(cfg) -> dict:
    """What the projection needs from a stage-3 config: who trains, who serves the reference, how many, how costly."""
    sc = cfg.preference_tuning_config.logprob_processor_scaling_config
    actors = sc.concurrency if isinstance(sc.concurrency, int) else sc.concurrency[1]  # as the plan: the most
    gpus_per_actor = (1.0 if sc.num_gpus == "auto" else sc.num_gpus) * \
        cfg.preference_tuning_config.reference_tensor_parallel_size
    lora, gc = cfg.lora_config is not None, cfg.gradient_checkpointing
    balance = pool_balance(gpu=True, trainers=cfg.num_devices, worker_resources=cfg.worker_resources,
                           trainer_cpus=cfg.num_cpus_per_worker, actors=actors, actor_resources=sc.custom_resources,
                           actor_cpus=sc.num_cpus, actor_gpus=gpus_per_actor, lora=lora, gradient_checkpointing=gc)
    if balance is None:
        raise SystemExit(f"no nominal TFLOPS for {cfg.worker_resources} or {sc.custom_resources} in "
                         f"common.capacity.NOMINAL_TFLOPS")
    return {"trainers": cfg.num_devices, "train_gpu": accelerator(cfg.worker_resources), "actors": actors,
            "ref_gpu": accelerator(sc.custom_resources), "ref_gpus": actors * gpus_per_actor, "lora": lora,
            "gc": gc, "cost": step_cost(lora, gc), "epochs": cfg.num_epochs, "balance": balance}


def project(shape: dict, *, pairs: int, tokens: int, params: float, mfu: float, prices: dict) -> dict:
    """Per-pair FLOPs and, for each of the three setups, wall hours (epoch 1, each later epoch, run) and GPU-hours."""
    step, ref = shape["cost"] * params * tokens, 2 * params * tokens  # FLOPs per pair (both sequences)
    train_rate = shape["trainers"] * NOMINAL_TFLOPS[shape["train_gpu"]] * 1e12 * mfu  # FLOP/s, all trainers
    pool_rate = shape["ref_gpus"] * NOMINAL_TFLOPS[shape["ref_gpu"]] * 1e12 * mfu
    hours = lambda flops, rate: pairs * flops / rate / 3600  # noqa: E731
    train = hours(step, train_rate)  # an epoch of policy steps alone
    n = shape["epochs"]
    rows = {  # setup -> (epoch 1, each later epoch), wall hours
        "ours": (max(train, hours(ref, pool_rate)), train),  # the slower side sets the pace of epoch 1
        "TRL inline": (hours(step + ref, train_rate), hours(step + ref, train_rate)),
        "TRL precompute": (hours(ref, train_rate) + train, train),
    }
    out = {"step_flops": step, "ref_flops": ref, "rows": {}}
    for name, (first, later) in rows.items():
        wall = first + (n - 1) * later
        trainer_h = shape["trainers"] * wall
        pool_h = shape["ref_gpus"] * first if name == "ours" else 0.0  # the pool works in epoch 1 only
        dollars = trainer_h * prices[shape["train_gpu"]] + pool_h * prices[shape["ref_gpu"]]
        out["rows"][name] = {"epoch1_h": first, "later_h": later, "wall_h": wall, "trainer_gpu_h": trainer_h,
                             "pool_gpu_h": pool_h, "dollars": dollars}
    ours, pre = out["rows"]["ours"], out["rows"]["TRL precompute"]
    # The pool's price per GPU-hour at which ours costs what TRL precompute does.
    out["break_even_ref_price"] = ((pre["dollars"] - ours["trainer_gpu_h"] * prices[shape["train_gpu"]])
                                   / ours["pool_gpu_h"])
    # A rerun on the same pairs and reference (a beta or learning-rate sweep) finds stage 3's reference cache
    # (<input_dir>/ref_logps/): no pool at all. TRL computes its reference again in every run.
    out["rerun_h"] = n * train
    out["rerun_dollars"] = shape["trainers"] * n * train * prices[shape["train_gpu"]]
    return out


def report(shape: dict, p: dict, *, pairs: int, tokens: int, params: float, mfu: float, prices: dict) -> str:
    """The projection as markdown: assumptions, the table, and the lines the doc's discussion quotes."""
    t, r, n = shape["train_gpu"], shape["ref_gpu"], shape["epochs"]
    tf = {g: NOMINAL_TFLOPS[g] for g in (t, r)}
    kind = ("LoRA" if shape["lora"] else "full fine-tuning") + (" + gradient checkpointing" if shape["gc"] else "")
    lines = [
        f"- Model {params:.3g} parameters; {pairs} pairs x {tokens} tokens (both sequences); {n} epochs; "
        f"utilisation {mfu:.0%} of nominal on every GPU.",
        f"- FLOPs per pair: policy step ({kind}: {shape['cost']}N a token) {p['step_flops']:.3g}; "
        f"reference forward (2N a token) {p['ref_flops']:.3g}.",
        *(f"- {g}: {tf[g]} nominal bf16 TFLOPS, {tf[g] * mfu:.0f} at {mfu:.0%}; ${prices[g]:.3f} per GPU-hour, "
          f"${prices[g] / (tf[g] * mfu * 1e12 * 3600) * 1e18:.3f} per 1e18 FLOPs" for g in dict.fromkeys((t, r))),
        f"- Reference pool supply / trainer demand: {shape['balance'].supply_over_demand:.2f} "
        f"({shape['actors']} {r} actors, {shape['trainers']} {t} trainers; common.capacity); "
        f"{shape['balance'].balanced_concurrency} actors balance them.",
        "",
        f"| setup | GPUs | epoch 1 | each later epoch | run ({n} epochs) | {t} GPU-h | {r} GPU-h | $ (run) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    gpus = {"ours": f"{shape['trainers']} {t} + {shape['ref_gpus']:g} {r}", "TRL inline": f"{shape['trainers']} {t}",
            "TRL precompute": f"{shape['trainers']} {t}"}
    label = {"ours": "ours (reference pool, epoch 1 only)", "TRL inline": "TRL inline reference",
             "TRL precompute": "TRL precompute_ref_log_probs"}
    for name, row in p["rows"].items():
        lines.append(f"| {label[name]} | {gpus[name]} | {row['epoch1_h'] * 60:.1f} min "
                     f"| {row['later_h'] * 60:.1f} min | {row['wall_h'] * 60:.1f} min "
                     f"| {row['trainer_gpu_h']:.2f} | {row['pool_gpu_h']:.2f} "
                     f"| ${row['dollars']:.2f} |")
    implied = (pairs * EXAMPLE_EPOCHS * p["step_flops"]
               / (EXAMPLE_HOURS * 3600 * EXAMPLE_A100_TRAINERS * NOMINAL_TFLOPS["A100"] * 1e12))
    lines += [
        "",
        f"- Ours costs what TRL precompute does when the {r} GPU-hour costs ${p['break_even_ref_price']:.2f} "
        f"(list ${prices[r]:.3f}).",
        f"- A rerun of ours on the same pairs and reference reads the reference cache: {p['rerun_h'] * 60:.1f} min, "
        f"{shape['trainers'] * p['rerun_h']:.2f} {t} GPU-h, ${p['rerun_dollars']:.2f}; "
        f"TRL pays its reference again.",
        f"- Cross-check: the example's ~{EXAMPLE_HOURS:g} h for {EXAMPLE_EPOCHS} epochs on "
        f"{EXAMPLE_A100_TRAINERS} A100 trainers (+2 A100 reference actors) implies {implied:.0%} utilisation "
        f"with these pairs and tokens.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/gpu/03_dpo_train.yaml", help="a stage-3 config")
    ap.add_argument("--pairs", type=int, default=PAIRS, help="training pairs per epoch")
    ap.add_argument("--tokens-per-pair", type=int, default=TOKENS_PER_PAIR,
                    help="tokens the model runs per pair: prompt+chosen plus prompt+rejected")
    ap.add_argument("--params", type=float, default=PARAMS, help="model parameters (N)")
    ap.add_argument("--mfu", type=float, default=MFU, help="utilisation of nominal bf16 TFLOPS, every GPU")
    ap.add_argument("--a100-price", type=float, default=PRICES["A100"], help="$ per A100-hour (p4d on-demand)")
    ap.add_argument("--a10g-price", type=float, default=PRICES["A10G"], help="$ per A10G-hour (g5 on-demand)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override as in the stage scripts, e.g. --set lora_config=null")
    args = ap.parse_args(argv)
    shape = run_shape(load_config("03_dpo_train", str(resolve(args.config)), args.set))
    prices = {**PRICES, "A100": args.a100_price, "A10G": args.a10g_price}
    for g in (shape["train_gpu"], shape["ref_gpu"]):
        prices.setdefault(g, float("nan"))  # a GPU without a price: $ shows nan, the rest stands
    kw = dict(pairs=args.pairs, tokens=args.tokens_per_pair, params=args.params, mfu=args.mfu, prices=prices)
    text = report(shape, project(shape, **kw), **kw)
    print(text)
    return text


if __name__ == "__main__":
    main()
