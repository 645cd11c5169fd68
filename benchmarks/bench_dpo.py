"""Stage 3 (DPO on Ray Train + the streaming reference actor pool) against TRL's DPOTrainer, in one run.

    .venv/bin/python benchmarks/bench_dpo.py                      # full size: 32 pairs, the default plan below
    .venv/bin/python benchmarks/bench_dpo.py --plan os,oq,t,t2,tp,oc   # LoRA only: each peer at its best
    .venv/bin/python benchmarks/bench_dpo.py --pairs 4 --plan os,t,tp,oc   # smoke test of the harness

Same model (models/smollm2-135m-instruct, bf16 weights), same pairs (ACLSum-derived, the recipe of
tests/test_dpo_stage.py::write_pairs), same batch size and max length (the stage-3 quickstart config's), same LoRA
setting (the quickstart's r=8 on all projections, built by the same `common.train_loop.build_model`), same 2 cores,
1 epoch. Each side at its best, found in the same invocation: TRL inline with 1 and with 2 torch threads, TRL with
`precompute_ref_log_probs=True` (on the faster thread count); ours with the trainer on one thread throughout and with
the quickstart's `cpu_threads_after_reference` (2 threads once the reference pass is over).

  (1) epoch wall time, ours at best / TRL at best (inline; precompute), LoRA          target <= 0.8x
  (1b) whole-process wall time, the same pairs of runs                                target <= 1.0x
  (2) trainer-process peak RSS for full fine-tuning (lora_config: null), ours / TRL     target <= 0.6x
  (3) overlap: ours with the streaming reference pool / ours on cached (precomputed) reference log-probs
      (stage 3's second run: `reference_cache: hit`), both with one trainer thread     target <= 1.05x

Ours runs as a user runs it: `03_dpo_train/train.py --config configs/quickstart/03_dpo_train.yaml --set ...` in
its own process (its own local Ray); times come from its manifest and metrics.jsonl (epoch = the sum of the step
times: the epoch loop, every wait for reference data included; `seconds`: the whole stage). The trainer's peak RSS
is the VmHWM of the `ray::RayTrainWorker` process, sampled from /proc while it lives (only processes under our own
subprocess). TRL runs in a subprocess of this script (`--worker trl`): epoch time from TrainerCallback
on_epoch_begin/end, the precompute pass timed around DPOTrainer._precompute_ref_logps, peak RSS from
resource.getrusage(RUSAGE_SELF).ru_maxrss. Whole-process time is the wall time of each subprocess, measured by this
driver the same way for both sides.

Runs are interleaved (`--plan`) so a change in machine load hits both sides; the load average is recorded next to
every run.
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

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (PY, REPO, bench_env, emit, loadavg, machine, result_marker_json, run_logged,  # noqa: E402
                     save, versions)

CONFIG = REPO / "configs/quickstart/03_dpo_train.yaml"
QUICKSTART = yaml.safe_load(CONFIG.read_text())
FULL_LR = 5.0e-6  # the quickstart config comment's full fine-tuning rate
# Larger members of the embedded model's family (the published config.json of HuggingFaceTB/SmolLM2-360M-Instruct and
# SmolLM2-1.7B-Instruct); every other field is the embedded 135M's. Built with random weights at run time.
SHAPES = {
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32),
}


def random_model(shape: str, workdir: Path) -> Path:
    """The embedded model's architecture at a larger published size, random weights (`from_config`: nothing to
    download), saved once beside the embedded tokenizer. What it says is noise; only time and memory are measured."""
    import os

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = workdir / "models" / f"{shape}-random"
    if (out / "config.json").exists():
        return out
    base = REPO / QUICKSTART["model_id"]
    cfg = AutoConfig.from_pretrained(base)
    for k, v in SHAPES[shape].items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")  # a half-written folder never looks like a model
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    os.replace(tmp, out)
    print(f"[bench_dpo] {shape} with random weights: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"parameters, in {out}", flush=True)
    return out


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
    if args.model_id:
        sets.append(f"model_id={args.model_id}")
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
        # TRL's own answer to the reference's cost: one reference pass over the data before training. Its batch
        # is our reference actor's (the quickstart's logprob_processor batch_size).
        precompute_ref_log_probs=args.precompute,
        precompute_ref_batch_size=ptc.logprob_processor_scaling_config.batch_size if args.precompute else None,
    )
    epochs: list[dict] = []
    precompute = _time_precompute(DPOTrainer)

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
        "sequence_tokens_per_epoch": ntok, "precompute": precompute,
        "precompute_seconds": round(sum(p["seconds"] for p in precompute), 2) if args.precompute else None,
    })


def _time_precompute(trainer_cls) -> list[dict]:
    """Wrap TRL's reference pre-pass (run inside DPOTrainer.__init__) with a timer; the records land in the list."""
    records: list[dict] = []
    inner = trainer_cls._precompute_ref_logps

    def timed(self, dataset, name, batch_size):
        t0 = time.perf_counter()
        out = inner(self, dataset, name, batch_size)
        records.append({"dataset": name, "rows": len(dataset), "batch_size": batch_size,
                        "seconds": round(time.perf_counter() - t0, 2)})
        return out

    trainer_cls._precompute_ref_logps = timed
    return records


# --------------------------------------------------------------------------------------------------- driver
def run_ours(name: str, pairs: Path, out_dir: Path, args, full: bool = False, gradient_checkpointing: bool = False,
             quickstart_threads: bool = False) -> dict:
    # One trainer thread throughout unless `quickstart_threads`: then the quickstart's own
    # cpu_threads_after_reference (the trainer takes the reference actor's core once the reference pass is over).
    sets = [f"train_path={pairs}", f"output_dir={out_dir}", f"num_epochs={args.epochs}"]
    if args.model_id:
        sets.append(f"model_id={args.model_id}")
    if not quickstart_threads:
        sets.append("cpu_threads_after_reference=null")
    if full:
        sets += ["lora_config=null", f"learning_rate={FULL_LR}"]
    if gradient_checkpointing:
        sets += ["gradient_checkpointing=true"]
    cmd = [PY, str(REPO / "03_dpo_train/train.py"), "--config", str(CONFIG), "--force"]
    for s in sets:
        cmd += ["--set", s]
    logs = Path(args.workdir) / "logs"
    load0 = loadavg()
    rc, wall, sampler = run_logged(cmd, logs / f"{name}.log", bench_env(), args.timeout, sample_memory=True)
    res = {"name": name, "side": "ours", "full": full, "rc": rc, "process_seconds": round(wall, 2),
           "whole_process_seconds": round(wall, 2), "load_before": load0, "load_after": loadavg(),
           "cpu_threads_after_reference": QUICKSTART.get("cpu_threads_after_reference") if quickstart_threads
           else None}
    mf = out_dir / "03_dpo_train" / "manifest.json"
    if rc != 0 or not mf.exists():
        res["error"] = f"exit {rc}; see {logs / (name + '.log')}"
        return res
    res.update(_ours_stats(out_dir / "03_dpo_train", json.loads(mf.read_text())))
    res.update({"trainer_peak_rss_mib": sampler.peak_mib("RayTrainWorker"),
                "reference_actor_peak_rss_mib": sampler.peak_mib("ReferenceLogProbProcessor"),
                "driver_peak_rss_mib": sampler.peak_mib("03_dpo_train/train.py")})
    return res


def _ours_stats(stage_dir: Path, m: dict) -> dict:
    """Epoch, step and loss figures of one stage-3 run, from its manifest and metrics.jsonl."""
    st = m["stats"]
    metrics = [json.loads(line) for line in open(stage_dir / "metrics.jsonl")]
    metrics = [r for r in metrics if "step_seconds" in r]
    per_epoch: dict[int, dict] = {}
    for r in metrics:
        e = per_epoch.setdefault(r["epoch"], {"seconds": 0.0, "ref_wait_seconds": 0.0, "steps": 0})
        e["seconds"] += r["step_seconds"]
        e["ref_wait_seconds"] += r.get("ref_wait_seconds", 0.0)
        e["steps"] += 1
    return {
        "stage_seconds": m["seconds"], "train_seconds": round(st["train_seconds"], 2),
        "ref_wait_seconds": round(st["ref_wait_seconds"], 2), "reference_cache": st["reference_cache"],
        "epochs": [{"seconds": round(v["seconds"], 2), "ref_wait_seconds": round(v["ref_wait_seconds"], 2),
                    "steps": v["steps"]} for _, v in sorted(per_epoch.items())],
        "first_step_seconds": round(metrics[0]["step_seconds"], 2) if metrics else None,
        "first_step_ref_wait_seconds": round(metrics[0].get("ref_wait_seconds", 0.0), 2) if metrics else None,
        "steady_step_seconds": round(sum(r["step_seconds"] for r in metrics[1:]) / max(1, len(metrics) - 1), 2),
        "steps": st["steps"], "first_loss": st["first_metrics"].get("loss"),
        "final_loss": st["final_metrics"].get("loss"), "pairs_trained": m["rows"]["pairs_trained"],
    }


def run_trl(name: str, pairs: Path, args, full: bool = False, gradient_checkpointing: bool = False,
            threads: int = 1, precompute: bool = False) -> dict:
    work = Path(args.workdir)
    cmd = [PY, str(Path(__file__).resolve()), "--worker", "trl", "--pairs-file", str(pairs), "--workdir", str(work),
           "--epochs", str(args.epochs), "--threads", str(threads)] + (["--full"] if full else []) + \
          (["--trl-gradient-checkpointing"] if gradient_checkpointing else []) + \
          (["--trl-autocast"] if args.trl_autocast else []) + (["--precompute"] if precompute else []) + \
          (["--model-id", args.model_id] if args.model_id else [])
    logs = work / "logs"
    load0 = loadavg()
    rc, wall, _ = run_logged(cmd, logs / f"{name}.log", bench_env(), args.timeout)
    res = {"name": name, "side": "trl", "full": full, "rc": rc, "wall_seconds": round(wall, 2),
           "whole_process_seconds": round(wall, 2), "load_before": load0, "load_after": loadavg()}
    r = result_marker_json(logs / f"{name}.log")
    if rc != 0 or r is None:
        res["error"] = f"exit {rc}; see {logs / (name + '.log')}"
        return res
    res.update(r)
    return res


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def _med(vals):
    vals = [v for v in vals if v is not None]
    return round(statistics.median(vals), 2) if vals else None


def _ep1(r):
    return r["epochs"][0]["seconds"] if r.get("epochs") else None


def _best_trl_threads(runs: list[dict], fallback: int) -> int:
    """The torch thread count of the fastest TRL LoRA inline epoch so far in this invocation."""
    inline = [r for r in runs if r["name"].startswith("trl_lora_") and "precompute" not in r["name"]
              and "error" not in r and _ep1(r) is not None]
    return min(inline, key=_ep1)["torch_threads"] if inline else fallback


OURS_RUNS = {  # plan token -> (run name, full fine-tuning, gradient checkpointing, the quickstart's thread setting)
    "os": ("ours_lora_stream", False, False, False),
    "oq": ("ours_lora_stream_quickstart_threads", False, False, True),
    "of": ("ours_full_stream", True, False, False),
    "ofg": ("oursgc_full_stream", True, True, False),
}


def _show(runs: list[dict], r: dict) -> dict:
    keys = ("name", "rc", "whole_process_seconds", "train_seconds", "ref_wait_seconds", "epochs", "precompute_seconds",
            "torch_threads", "reference_cache", "trainer_peak_rss_mib", "peak_rss_mib", "load_before", "error")
    print("[bench_dpo] " + json.dumps({k: r[k] for k in keys if k in r}), flush=True)
    runs.append(r)
    return r


def run_plan(args, pairs: Path) -> list[dict]:
    runs: list[dict] = []
    show = lambda r: _show(runs, r)  # noqa: E731
    work = Path(args.workdir)
    cached_dir = work / "ours_cached"
    shutil.rmtree(cached_dir, ignore_errors=True)  # filled by this invocation's first streaming LoRA run
    count: dict[str, int] = {}
    for tok in [t.strip() for t in args.plan.split(",") if t.strip()]:
        k = count[tok] = count.get(tok, -1) + 1
        if tok in OURS_RUNS:  # ours, streaming reference pool: fresh output dir, so a real cache miss
            name, full, gc, qs = OURS_RUNS[tok]
            fresh = work / f"{name}_{k}"
            shutil.rmtree(fresh, ignore_errors=True)
            r = show(run_ours(f"{name}_{k}", pairs, fresh, args, full, gc, qs))
            if not full and "error" not in r and not (cached_dir / "ref_logps").exists():
                shutil.copytree(fresh / "ref_logps", cached_dir / "ref_logps")  # the cache "oc" runs will hit
        elif tok == "oc":  # ours on the reference cache a streaming run wrote (stage 3's rerun: cache hit)
            if not (cached_dir / "ref_logps").exists():
                raise SystemExit("--plan: 'oc' needs an earlier 'os' or 'oq' run (it reuses its reference cache)")
            show(run_ours(f"ours_lora_cached_{k}", pairs, cached_dir, args))
        elif tok in ("t", "t2"):
            n = 2 if tok == "t2" else args.trl_threads
            show(run_trl(f"trl_lora_{n}thr_{k}", pairs, args, threads=n))
        elif tok == "tp":  # precompute, on the thread count that ran TRL's inline epoch fastest so far
            n = _best_trl_threads(runs, 2)
            show(run_trl(f"trl_lora_precompute_{n}thr_{k}", pairs, args, threads=n, precompute=True))
        elif tok in ("tf", "tfg"):  # tfg: TRL's default gradient checkpointing (memory for time)
            show(run_trl(f"{'trlgc' if tok == 'tfg' else 'trl'}_full_{k}", pairs, args, full=True,
                         gradient_checkpointing=tok == "tfg", threads=args.trl_threads))
        else:
            known = ", ".join([*OURS_RUNS, "oc", "t", "t2", "tp", "tf", "tfg"])
            raise SystemExit(f"--plan: unknown run '{tok}' (known: {known})")
    return runs


def _groups(ok: list[dict], prefix: str) -> dict[str, dict]:
    """Runs whose name starts with `prefix`, grouped by name without the repeat index: medians per group."""
    out: dict[str, list[dict]] = {}
    for r in ok:
        if r["name"].startswith(prefix):
            out.setdefault(re.sub(r"_\d+$", "", r["name"]), []).append(r)
    return {g: {"epoch1_seconds": _med(map(_ep1, rs)), "whole_process_seconds": _med(r["whole_process_seconds"]
                                                                                    for r in rs),
                "precompute_seconds": _med(r.get("precompute_seconds") for r in rs), "runs": len(rs)}
            for g, rs in out.items()}


def _best(groups: dict[str, dict]) -> dict | None:
    """The group with the shortest epoch, as {"run": name, **its medians}."""
    timed = {g: v for g, v in groups.items() if v["epoch1_seconds"] is not None}
    if not timed:
        return None
    g = min(timed, key=lambda k: timed[k]["epoch1_seconds"])
    return {"run": g, **timed[g]}


def lora_summary(ok: list[dict]) -> dict:
    ours = _groups(ok, "ours_lora_stream")
    trl = _groups(ok, "trl_lora_")
    inline = {g: v for g, v in trl.items() if "precompute" not in g}
    pre = {g: v for g, v in trl.items() if "precompute" in g}
    best = {"ours": _best(ours), "trl_inline": _best(inline), "trl_precompute": _best(pre)}
    s = {"lora_runs": {**ours, **_groups(ok, "ours_lora_cached"), **trl}, "best": best}
    get = lambda side, key: (best[side] or {}).get(key)  # noqa: E731
    for peer, tag in (("trl_inline", "inline"), ("trl_precompute", "precompute")):
        s[f"ratio_1_epoch_ours_best_vs_trl_{tag}_best"] = _ratio(get("ours", "epoch1_seconds"),
                                                                 get(peer, "epoch1_seconds"))
        s[f"ratio_1b_process_ours_best_vs_trl_{tag}_best"] = _ratio(get("ours", "whole_process_seconds"),
                                                                    get(peer, "whole_process_seconds"))
    pre_total = (get("trl_precompute", "epoch1_seconds") or 0) + (get("trl_precompute", "precompute_seconds") or 0)
    s["ratio_1c_epoch_ours_best_vs_trl_precompute_epoch_plus_precompute"] = _ratio(
        get("ours", "epoch1_seconds"), pre_total or None)
    one_thread = ours.get("ours_lora_stream", {})
    cached = _groups(ok, "ours_lora_cached").get("ours_lora_cached", {})
    s["ratio_3_overlap_stream_vs_cached"] = _ratio(one_thread.get("epoch1_seconds"), cached.get("epoch1_seconds"))
    return s


def full_ft_summary(ok: list[dict]) -> dict:
    s: dict = {}
    first = lambda prefix: next((r for r in ok if r["name"].startswith(prefix)), None)  # noqa: E731
    pairs = (("ours_full", "trl_full", "2"), ("oursgc_full", "trlgc_full", "2b_gradient_checkpointing"))
    for ours_p, trl_p, tag in pairs:
        o, t = first(ours_p), first(trl_p)
        if o and t:
            s[f"full_ft_peak_rss_mib_{tag}"] = {"ours_trainer": o["trainer_peak_rss_mib"], "trl": t["peak_rss_mib"],
                                                "trl_after_imports": t["rss_after_imports_mib"]}
            s[f"ratio_{tag}_full_ft_peak_rss_ours_vs_trl"] = _ratio(o["trainer_peak_rss_mib"], t["peak_rss_mib"])
            s[f"ratio_{tag}_full_ft_epoch_ours_vs_trl"] = _ratio(_ep1(o), _ep1(t))
    return s


TARGETS = {"ratio_1_epoch_ours_best_vs_trl_inline_best": 0.8, "ratio_1b_process_ours_best_vs_trl_inline_best": 1.0,
           "ratio_1_epoch_ours_best_vs_trl_precompute_best": 0.8,
           "ratio_1b_process_ours_best_vs_trl_precompute_best": 1.0,
           "ratio_2_full_ft_peak_rss_ours_vs_trl": 0.6, "ratio_3_overlap_stream_vs_cached": 1.05}


def report(args, runs: list[dict], seconds: float) -> None:
    ok = [r for r in runs if "error" not in r]
    summary = {**lora_summary(ok), **full_ft_summary(ok)}
    result = {
        "benchmark": "bench_dpo", "date": datetime.date.today().isoformat(), "machine": machine(),
        "versions": versions(), "pairs": args.pairs, "epochs": args.epochs, "plan": args.plan,
        "model": f"{args.model_shape} (random weights)" if args.model_shape else QUICKSTART["model_id"],
        "batch_size": QUICKSTART["train_batch_size_per_device"], "total_seconds": round(seconds, 1), "runs": runs,
        "summary": summary,
        "targets": {k: {"target": v, "measured": summary.get(k),
                        "met": summary.get(k) is not None and summary[k] <= v} for k, v in TARGETS.items()},
    }
    print("\n[bench_dpo] summary (LoRA: medians per run kind; epoch s / whole process s / TRL precompute s)",
          flush=True)
    for g, v in summary["lora_runs"].items():
        print(f"    {g:<40} {v['epoch1_seconds']} / {v['whole_process_seconds']} / {v['precompute_seconds']}",
              flush=True)
    for k, v in summary.items():
        if k != "lora_runs":
            print(f"    {k}: {v}", flush=True)
    for k, v in result["targets"].items():
        verdict = "not run" if v["measured"] is None else "met" if v["met"] else "MISSED"
        print(f"    TARGET {k}: measured {v['measured']} (target <= {v['target']}) -> {verdict}", flush=True)
    save(result, args.out, "dpo")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--pairs", type=int, default=32, help="ACLSum-derived pairs (default 32)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--plan", default="os,t,oq,t2,tp,oc,of,tf",
                    help="runs in order, comma-separated: os = ours LoRA, streaming reference pool (cache miss), one "
                         "trainer thread; oq = the same with the quickstart's cpu_threads_after_reference; t / t2 = "
                         "TRL LoRA inline with --trl-threads / 2 torch threads; tp = TRL LoRA with "
                         "precompute_ref_log_probs=True on the thread count of the faster of t / t2 so far (2 if "
                         "none); oc = ours LoRA on the reference cache (hit); of / tf = ours / TRL full "
                         "fine-tuning; ofg / tfg = of / tf with gradient checkpointing (TRL's default). Repeat a "
                         "token to repeat a run (medians)")
    ap.add_argument("--model-shape", choices=sorted(SHAPES),
                    help="instead of the embedded 135M model, its architecture at this published size with random "
                         "weights, built at run time (for time and memory only)")
    ap.add_argument("--workdir", default="/tmp/bench_dpo")
    ap.add_argument("--out", default=None, help="results json (default benchmarks/results/dpo-<date>.json)")
    ap.add_argument("--timeout", type=int, default=1200, help="per run, seconds")
    # worker mode
    ap.add_argument("--worker", choices=["trl"], help=argparse.SUPPRESS)
    ap.add_argument("--pairs-file", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-id", help=argparse.SUPPRESS)  # worker: the model folder both sides train
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)  # worker: 0 = torch default
    ap.add_argument("--trl-gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trl-autocast", action="store_true", help="TRL with its default bf16=True autocast")
    ap.add_argument("--trl-threads", type=int, default=1,
                    help="torch threads for the `t`, `tf` and `tfg` runs (default 1; `t2` is TRL with 2); "
                         "0 = torch's default, one per core")
    args = ap.parse_args()
    if args.worker == "trl":
        sys.path.insert(0, str(REPO))
        return trl_worker(args)

    pairs = write_pairs(Path(args.workdir) / "pairs.jsonl", args.pairs)
    if args.model_shape:
        args.model_id = str(random_model(args.model_shape, Path(args.workdir)))
    t_all = time.perf_counter()
    print(f"[bench_dpo] {args.pairs} pairs, {args.epochs} epoch(s), plan {args.plan}, logs in "
          f"{Path(args.workdir) / 'logs'}; load {loadavg()}", flush=True)
    runs = run_plan(args, pairs)
    report(args, runs, time.perf_counter() - t_all)


if __name__ == "__main__":
    main()
