"""Stage 3 (DPO on Ray Train + the streaming reference actor pool) against TRL's DPOTrainer, in one run.

    .venv/bin/python benchmarks/bench_dpo.py                      # full size: 32 pairs, 5 runs, ~12 min here
    .venv/bin/python benchmarks/bench_dpo.py --plan os,t,oc,os,oc,ofg,tfg   # repeats + gradient checkpointing
    .venv/bin/python benchmarks/bench_dpo.py --pairs 4 --plan os,t,oc   # smoke test of the harness (~5 min)

Same model (models/smollm2-135m-instruct, bf16), same pairs (ACLSum-derived, the recipe of
tests/test_dpo_stage.py::write_pairs), same batch size (4 pairs), same max length (512), same LoRA setting (the
quickstart's r=8 on all projections, built by the same `common.train_loop.build_model`), same 2 cores, 1 epoch:

  (1) epoch wall time, ours / TRL, LoRA (the quickstart setting)                target <= 0.8x
  (2) trainer-process peak RSS for full fine-tuning (lora_config: null), ours / TRL     target <= 0.6x
  (3) overlap: ours with the streaming reference pool / ours on cached (precomputed) reference log-probs
      (stage 3's second run: `reference_cache: hit`)                            target <= 1.1x

Ours runs as a user runs it: `03_dpo_train/train.py --config configs/quickstart/03_dpo_train.yaml --set ...` in
its own process (its own local Ray); times come from its manifest (`stats.train_seconds`: the epoch loop, first
batch wait included; `stats.ref_wait_seconds`; `seconds`: the whole stage). The trainer's peak RSS is the VmHWM of
the `ray::RayTrainWorker` process, sampled from /proc while it lives (only processes under our own subprocess).
TRL runs in a subprocess of this script (`--worker trl`): epoch time from TrainerCallback on_epoch_begin/end,
peak RSS from resource.getrusage(RUSAGE_SELF).ru_maxrss.

Runs are interleaved (`--plan`, default os,t,oc,of,tf: ours, TRL, ours-cached, ours full, TRL full) so a change in
machine load hits both sides; the load average is recorded next to every run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (PY, REPO, bench_env, emit, loadavg, machine, result_marker_json, run_logged,  # noqa: E402
                     save, versions)

CONFIG = REPO / "configs/quickstart/03_dpo_train.yaml"
LORA_LR, FULL_LR = 2.0e-4, 5.0e-6  # the quickstart's LoRA rate; its comment's full fine-tuning rate


# ------------------------------------------------------------------------------------------------- the pairs
def write_pairs(path: Path, n: int, split: str = "test") -> Path:
    """The recipe of tests/test_dpo_stage.py::write_pairs: prompt = 'Summarize in one sentence.' + the human
    summary, chosen = its first sentence, rejected = the whole summary."""
    rows = [json.loads(line) for line in open(REPO / f"data/aclsum/{split}.jsonl")][:n]
    if len(rows) < n:
        raise SystemExit(f"data/aclsum/{split}.jsonl has only {len(rows)} rows")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            pair = {"prompt": [{"role": "user", "content": "Summarize in one sentence.\n\n" + r["summary"]}],
                    "chosen": r["summary"].split(". ")[0].rstrip(".") + ".", "rejected": r["summary"]}
            f.write(json.dumps(pair) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ TRL worker
def trl_worker(args) -> None:
    import resource

    t_start = time.perf_counter()
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from common.config import load_config
    from common.train_loop import build_model

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sets = [f"train_path={args.pairs_file}", f"num_epochs={args.epochs}"]
    if args.full:
        sets += ["lora_config=null", f"learning_rate={FULL_LR}"]
    cfg = load_config("03_dpo_train", str(CONFIG), sets)
    torch.manual_seed(cfg.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(cfg.model_id)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    # The very model stage 3 trains: same dtype, same peft LoRA construction (or the plain model for full FT).
    model = build_model(cfg, getattr(torch, cfg.dtype))
    rows = []
    for line in open(args.pairs_file):
        r = json.loads(line)
        as_msgs = (lambda x: [{"role": "assistant", "content": x}] if isinstance(x, str) else x)
        rows.append({"prompt": r["prompt"], "chosen": as_msgs(r["chosen"]), "rejected": as_msgs(r["rejected"])})
    ds = Dataset.from_list(rows)
    ptc = cfg.preference_tuning_config
    targs = DPOConfig(
        output_dir=str(Path(args.workdir) / "trl_out"),
        per_device_train_batch_size=cfg.train_batch_size_per_device,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        beta=ptc.beta,
        loss_type=[ptc.loss_type],
        max_length=cfg.context_length,
        # Stage 3 does not checkpoint activations; TRL's default (True) would trade time for memory.
        gradient_checkpointing=args.trl_gradient_checkpointing,
        # Stage 3 trains bf16 weights directly (no autocast, no fp32 master copy). The matched TRL setting is the
        # same bf16 model with bf16=False; --trl-autocast gives TRL's default (bf16=True: torch.autocast on top).
        bf16=args.trl_autocast,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    epochs: list[dict] = []

    class EpochTimer(TrainerCallback):
        def on_epoch_begin(self, a, state, control, **kw):
            epochs.append({"t0": time.perf_counter(), "step0": state.global_step})

        def on_epoch_end(self, a, state, control, **kw):
            epochs[-1].update(seconds=time.perf_counter() - epochs[-1]["t0"], steps=state.global_step -
                              epochs[-1]["step0"])

    trainer = DPOTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok,
                         callbacks=[EpochTimer()])
    setup_seconds = time.perf_counter() - t0
    ntok = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"])
               for r in trainer.train_dataset)
    out = trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    emit({
        "side": "trl", "full": args.full, "epochs": [{"seconds": round(e["seconds"], 2), "steps": e["steps"]}
                                                      for e in epochs],
        "train_runtime": out.metrics.get("train_runtime"), "setup_seconds": round(setup_seconds, 2),
        "process_seconds": round(time.perf_counter() - t_start, 2), "steps": trainer.state.global_step,
        "first_loss": logs[0]["loss"] if logs else None, "final_loss": logs[-1]["loss"] if logs else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_imports_mib": round(rss_imports / 1024, 1), "rss_at_start_mib": round(rss_start / 1024, 1),
        "torch_threads": torch.get_num_threads(), "ref_model_in_process": trainer.ref_model is not None,
        "sequence_tokens_per_epoch": ntok,
    })


# --------------------------------------------------------------------------------------------------- driver
def run_ours(name: str, pairs: Path, out_dir: Path, epochs: int, full: bool, logs: Path, timeout: int,
             gradient_checkpointing: bool = False) -> dict:
    # One trainer thread throughout, like TRL here: the quickstart's second thread after the reference pass would
    # make the comparison one of core counts (and the cached run would get it from step 1).
    sets = [f"train_path={pairs}", f"output_dir={out_dir}", f"num_epochs={epochs}", "cpu_threads_after_reference=null"]
    if full:
        sets += ["lora_config=null", f"learning_rate={FULL_LR}"]
    if gradient_checkpointing:
        sets += ["gradient_checkpointing=true"]
    cmd = [PY, str(REPO / "03_dpo_train/train.py"), "--config", str(CONFIG), "--force"]
    for s in sets:
        cmd += ["--set", s]
    load0 = loadavg()
    rc, wall, sampler = run_logged(cmd, logs / f"{name}.log", bench_env(), timeout, sample_memory=True)
    res = {"name": name, "side": "ours", "full": full, "rc": rc, "process_seconds": round(wall, 2),
           "load_before": load0, "load_after": loadavg()}
    mf = out_dir / "03_dpo_train" / "manifest.json"
    if rc != 0 or not mf.exists():
        res["error"] = f"exit {rc}; see {logs / (name + '.log')}"
        return res
    m = json.loads(mf.read_text())
    st = m["stats"]
    metrics = [json.loads(line) for line in open(out_dir / "03_dpo_train" / "metrics.jsonl")]
    per_epoch: dict[int, dict] = {}
    for r in metrics:
        e = per_epoch.setdefault(r["epoch"], {"seconds": 0.0, "ref_wait_seconds": 0.0, "steps": 0})
        e["seconds"] += r["step_seconds"]
        e["ref_wait_seconds"] += r.get("ref_wait_seconds", 0.0)
        e["steps"] += 1
    res.update({
        "stage_seconds": m["seconds"], "train_seconds": round(st["train_seconds"], 2),
        "ref_wait_seconds": round(st["ref_wait_seconds"], 2), "reference_cache": st["reference_cache"],
        "epochs": [{"seconds": round(v["seconds"], 2), "ref_wait_seconds": round(v["ref_wait_seconds"], 2),
                    "steps": v["steps"]} for _, v in sorted(per_epoch.items())],
        "first_step_seconds": round(metrics[0]["step_seconds"], 2) if metrics else None,
        "first_step_ref_wait_seconds": round(metrics[0].get("ref_wait_seconds", 0.0), 2) if metrics else None,
        "steady_step_seconds": round(sum(r["step_seconds"] for r in metrics[1:]) / max(1, len(metrics) - 1), 2),
        "steps": st["steps"], "first_loss": st["first_metrics"].get("loss"),
        "final_loss": st["final_metrics"].get("loss"),
        "trainer_peak_rss_mib": sampler.peak_mib("RayTrainWorker"),
        "reference_actor_peak_rss_mib": sampler.peak_mib("ReferenceLogProbProcessor"),
        "driver_peak_rss_mib": sampler.peak_mib("03_dpo_train/train.py"),
        "pairs_trained": m["rows"]["pairs_trained"],
    })
    return res


def run_trl(name: str, pairs: Path, work: Path, epochs: int, full: bool, logs: Path, timeout: int,
            gradient_checkpointing: bool = False, autocast: bool = False, threads: int = 1) -> dict:
    cmd = [PY, str(Path(__file__).resolve()), "--worker", "trl", "--pairs-file", str(pairs), "--workdir", str(work),
           "--epochs", str(epochs), "--threads", str(threads)] + (["--full"] if full else []) + \
          (["--trl-gradient-checkpointing"] if gradient_checkpointing else []) + \
          (["--trl-autocast"] if autocast else [])
    load0 = loadavg()
    rc, wall, _ = run_logged(cmd, logs / f"{name}.log", bench_env(), timeout)
    res = {"name": name, "side": "trl", "full": full, "rc": rc, "wall_seconds": round(wall, 2),
           "load_before": load0, "load_after": loadavg()}
    r = result_marker_json(logs / f"{name}.log")
    if rc != 0 or r is None:
        res["error"] = f"exit {rc}; see {logs / (name + '.log')}"
        return res
    res.update(r)
    return res


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--pairs", type=int, default=32, help="ACLSum-derived pairs (default 32: 8 steps of 4)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--plan", default="os,t,oc,of,tf",
                    help="runs in order, comma-separated: os = ours LoRA, streaming reference pool (cache miss); "
                         "t = TRL LoRA; oc = ours LoRA on the reference cache (hit); of / tf = ours / TRL full "
                         "fine-tuning; ofg / tfg = of / tf with gradient checkpointing (TRL's default). E.g. os,t,oc,os,oc "
                         "for an interleaved A/B of (3)")
    ap.add_argument("--workdir", default="/tmp/bench_dpo")
    ap.add_argument("--out", default=None, help="results json (default benchmarks/results/dpo-<date>.json)")
    ap.add_argument("--timeout", type=int, default=1200, help="per run, seconds")
    # worker mode
    ap.add_argument("--worker", choices=["trl"], help=argparse.SUPPRESS)
    ap.add_argument("--pairs-file", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)  # worker: 0 = torch default
    ap.add_argument("--trl-gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trl-autocast", action="store_true", help="TRL with its default bf16=True autocast")
    ap.add_argument("--trl-threads", type=int, default=1,
                    help="torch threads for TRL: 1 (its fastest on this shared 2-core machine, see "
                         "docs/benchmarks.md); 0 = torch's default, one per core")
    args = ap.parse_args()
    if args.worker == "trl":
        sys.path.insert(0, str(REPO))
        return trl_worker(args)

    work = Path(args.workdir)
    logs = work / "logs"
    pairs = write_pairs(work / "pairs.jsonl", args.pairs)
    t_all = time.perf_counter()
    print(f"[bench_dpo] {args.pairs} pairs, {args.epochs} epoch(s), logs in {logs}; load {loadavg()}", flush=True)
    runs: list[dict] = []

    def show(r: dict) -> dict:
        keys = ("name", "rc", "process_seconds", "wall_seconds", "train_seconds", "ref_wait_seconds", "epochs",
                "reference_cache", "trainer_peak_rss_mib", "peak_rss_mib", "load_before", "error")
        print("[bench_dpo] " + json.dumps({k: r[k] for k in keys if k in r}), flush=True)
        runs.append(r)
        return r

    cached_dir = work / "ours_cached"
    shutil.rmtree(cached_dir, ignore_errors=True)  # filled by this invocation's first streaming LoRA run
    count: dict[str, int] = {}
    trl_kw = dict(autocast=args.trl_autocast, threads=args.trl_threads)
    for tok in [t.strip() for t in args.plan.split(",") if t.strip()]:
        k = count[tok] = count.get(tok, -1) + 1
        if tok in ("os", "of", "ofg"):  # ours, streaming reference pool: fresh output dir, so a real cache miss
            full = tok != "os"
            name = {"os": "ours_lora_stream", "of": "ours_full_stream", "ofg": "oursgc_full_stream"}[tok]
            fresh = work / f"{name}_{k}"
            shutil.rmtree(fresh, ignore_errors=True)
            r = show(run_ours(f"{name}_{k}", pairs, fresh, args.epochs, full, logs, args.timeout,
                              gradient_checkpointing=tok == "ofg"))
            if not full and "error" not in r and not (cached_dir / "ref_logps").exists():
                shutil.copytree(fresh / "ref_logps", cached_dir / "ref_logps")  # the cache "oc" runs will hit
        elif tok == "oc":  # ours on the reference cache a streaming run wrote (stage 3's rerun: cache hit)
            if not (cached_dir / "ref_logps").exists():
                raise SystemExit("--plan: 'oc' needs an earlier 'os' run (it reuses that run's reference cache)")
            show(run_ours(f"ours_lora_cached_{k}", pairs, cached_dir, args.epochs, False, logs, args.timeout))
        elif tok in ("t", "tf"):
            full = tok == "tf"
            show(run_trl(f"{'trl_full' if full else 'trl_lora'}_{k}", pairs, work, args.epochs, full, logs,
                         args.timeout, **trl_kw))
        elif tok == "tfg":  # TRL full fine-tuning with its default gradient checkpointing (memory for time)
            show(run_trl(f"trlgc_full_{k}", pairs, work, args.epochs, True, logs, args.timeout,
                         gradient_checkpointing=True, **trl_kw))
        else:
            raise SystemExit(f"--plan: unknown run '{tok}' (known: os, t, oc, of, tf, ofg, tfg)")

    def med(vals):
        vals = [v for v in vals if v is not None]
        return round(statistics.median(vals), 2) if vals else None

    ok = [r for r in runs if "error" not in r]
    stream = [r for r in ok if re.fullmatch(r"ours_lora_stream_\d+", r["name"])]
    cached = [r for r in ok if r["name"].startswith("ours_lora_cached")]
    trl_lora = [r for r in ok if r["name"].startswith("trl_lora")]
    ours_full = next((r for r in ok if r["name"].startswith("ours_full_stream")), None)
    trl_full = next((r for r in ok if r["name"].startswith("trl_full")), None)
    ep1 = lambda r: r["epochs"][0]["seconds"] if r.get("epochs") else None  # noqa: E731
    summary = {
        "epoch1_seconds": {"ours_stream": med(map(ep1, stream)), "ours_cached": med(map(ep1, cached)),
                           "trl": med(map(ep1, trl_lora))},
        "process_seconds": {"ours_stream": med(r["process_seconds"] for r in stream),
                            "ours_cached": med(r["process_seconds"] for r in cached),
                            "trl": med(r["process_seconds"] for r in trl_lora)},
    }
    summary["ratio_1_epoch_ours_vs_trl_lora"] = _ratio(summary["epoch1_seconds"]["ours_stream"],
                                                       summary["epoch1_seconds"]["trl"])
    summary["ratio_1b_process_ours_vs_trl_lora"] = _ratio(summary["process_seconds"]["ours_stream"],
                                                          summary["process_seconds"]["trl"])
    summary["ratio_3_overlap_stream_vs_cached"] = _ratio(summary["epoch1_seconds"]["ours_stream"],
                                                         summary["epoch1_seconds"]["ours_cached"])
    summary["ratio_3b_overlap_stage_seconds"] = _ratio(med(r["stage_seconds"] for r in stream),
                                                       med(r["stage_seconds"] for r in cached))
    if ours_full and trl_full:
        summary["full_ft_peak_rss_mib"] = {"ours_trainer": ours_full["trainer_peak_rss_mib"],
                                           "trl": trl_full["peak_rss_mib"],
                                           "trl_after_imports": trl_full["rss_after_imports_mib"]}
        summary["ratio_2_full_ft_peak_rss_ours_vs_trl"] = _ratio(ours_full["trainer_peak_rss_mib"],
                                                                 trl_full["peak_rss_mib"])
        summary["ratio_1c_epoch_full_ft_ours_vs_trl"] = _ratio(ep1(ours_full), ep1(trl_full))
    ours_gc = next((r for r in ok if r["name"].startswith("oursgc_full")), None)
    trl_gc = next((r for r in ok if r["name"].startswith("trlgc_full")), None)
    if ours_gc and trl_gc:  # both with gradient checkpointing
        summary["full_ft_gradient_checkpointing_peak_rss_mib"] = {"ours_trainer": ours_gc["trainer_peak_rss_mib"],
                                                                  "trl": trl_gc["peak_rss_mib"]}
        summary["ratio_2b_full_ft_peak_rss_ours_vs_trl_both_gradient_checkpointing"] = _ratio(
            ours_gc["trainer_peak_rss_mib"], trl_gc["peak_rss_mib"])
        summary["ratio_1d_epoch_full_ft_ours_vs_trl_both_gradient_checkpointing"] = _ratio(ep1(ours_gc), ep1(trl_gc))
    targets = {"ratio_1_epoch_ours_vs_trl_lora": 0.8, "ratio_2_full_ft_peak_rss_ours_vs_trl": 0.6,
               "ratio_3_overlap_stream_vs_cached": 1.1}
    result = {
        "benchmark": "bench_dpo", "date": datetime.date.today().isoformat(), "machine": machine(),
        "versions": versions(), "pairs": args.pairs, "epochs": args.epochs, "batch_size": 4,
        "total_seconds": round(time.perf_counter() - t_all, 1), "runs": runs, "summary": summary,
        "targets": {k: {"target": v, "measured": summary.get(k),
                        "met": summary.get(k) is not None and summary[k] <= v} for k, v in targets.items()},
    }
    print("\n[bench_dpo] summary", flush=True)
    for k, v in summary.items():
        print(f"    {k}: {v}", flush=True)
    for k, v in result["targets"].items():
        print(f"    TARGET {k}: measured {v['measured']} (target <= {v['target']}) -> "
              f"{'met' if v['met'] else 'MISSED'}", flush=True)
    save(result, args.out, "dpo")


if __name__ == "__main__":
    main()
