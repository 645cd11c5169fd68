"""Micro-benchmark of stage 3's log-prob function: one padded batch (before) vs one unpadded forward per sequence.

    .venv/bin/python benchmarks/micro_logps.py            # LoRA (quickstart): trainer 2 pairs, reference 4 pairs
    .venv/bin/python benchmarks/micro_logps.py --full     # full fine-tuning

The reference actor and the trainer both score pairs with `common.dpo_loss.model_logps`. Variant A is its previous
form: one forward of the right-padded [2B, T] batch (LM head on the trailing window from the batch's earliest
response). In bf16 a sequence's summed log-prob then depends on its batch (padding width, batch shape), so with the
quickstart's reference `batch_size` (4) differing from its `train_batch_size_per_device` (2), policy and reference
disagreed at step 0 although they are the same model. Variant B is the current `model_logps`: each sequence alone,
unpadded, LM head on its own response window; its log-prob no longer depends on the batch.

Each process builds the policy as the trainer does (`build_model`: LoRA, train mode) and the reference as the
actor does (eval, `inference_mode`), scores the reference batch (timed: the actor's seconds per pair), then trains
on the trainer batch: forward + log-probs + DPO loss + backward + AdamW (timed; the first step is warm-up). It
records step 0's max |policy - reference| log-prob. Variants alternate A-B, B-A in fresh processes so each peak RSS
(VmHWM) belongs to one variant. One torch thread, as the stage-3 trainer and the reference actor use.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PY, REPO, bench_env, loadavg, set_bench_env  # noqa: E402


def _hwm_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return 0.0


def padded_batch_logps(model, ids, attn, mask):
    """Variant A, the previous `model_logps`: one forward of the padded batch, the LM head on the trailing window
    that starts one position before the batch's earliest response."""
    from common.dpo_loss import sequence_logps

    width = ids.shape[1]
    keep = min(width, width - int(mask.int().argmax(dim=1).min()) + 1)
    logits = model(ids, attention_mask=attn, logits_to_keep=keep).logits
    return sequence_logps(logits, ids[:, width - keep:], mask[:, width - keep:])[0]


def worker(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from common.config import load_config
    from common.dpo_loss import dpo_loss, model_logps
    from common.tokenize import collate_pairs, load_tokenizer, tokenize_pair
    from common.train_loop import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    sets = ["train_path=x"] + (["lora_config=null"] if args.full else [])
    cfg = load_config("03_dpo_train", str(REPO / "configs/quickstart/03_dpo_train.yaml"), sets)
    ref_bs = cfg.preference_tuning_config.logprob_processor_scaling_config.batch_size
    train_bs = cfg.train_batch_size_per_device
    dtype = getattr(torch, cfg.dtype)
    policy = build_model(cfg, dtype)
    reference = AutoModelForCausalLM.from_pretrained(cfg.model_id, dtype=dtype).eval()
    tok = load_tokenizer(cfg.model_id)
    rows = [json.loads(line) for line in open(REPO / "data/aclsum/test.jsonl")][args.offset:args.offset + ref_bs]
    pairs = []
    for r in rows:  # the pairs of tests/test_dpo_stage.py
        prompt = [{"role": "user", "content": "Summarize in one sentence.\n\n" + r["summary"]}]
        pairs.append(tokenize_pair(tok, prompt, r["summary"].split(". ")[0].rstrip(".") + ".", r["summary"],
                                   cfg.context_length, cfg.max_prompt_length))

    def collate(ps):
        return collate_pairs([p["prompt_ids"] for p in ps], [p["chosen_ids"] for p in ps],
                             [p["rejected_ids"] for p in ps], 0)

    def score(model, ids, attn, mask):
        return padded_batch_logps(model, ids, attn, mask) if args.variant == "A" else \
            model_logps(model, ids, attn, mask)[0]

    ref_times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        with torch.inference_mode():
            ref = score(reference, *collate(pairs))
        ref_times.append(time.perf_counter() - t0)
    ref = ref.clone()
    ref_c, ref_r = ref[:train_bs], ref[ref_bs:ref_bs + train_bs]  # the trainer batch's pairs, as the actor scored them

    ids, attn, mask = collate(pairs[:train_bs])
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    times, step0 = [], None
    for _ in range(args.steps):
        t0 = time.perf_counter()
        logps = score(policy, ids, attn, mask)
        if step0 is None:
            step0 = torch.cat([logps[:train_bs] - ref_c, logps[train_bs:] - ref_r]).abs().max().item()
        losses, _, _ = dpo_loss(logps[:train_bs], logps[train_bs:], ref_c, ref_r, beta=0.1)
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print("MICRO_RESULT " + json.dumps({
        "variant": args.variant, "full": args.full, "train_shape": list(ids.shape), "step_seconds": times,
        "ref_seconds_per_pair": [t / ref_bs for t in ref_times], "step0_max_abs_logp_diff": step0,
        "peak_rss_mib": round(_hwm_mib(), 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of the quickstart LoRA")
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds, each variant in a fresh process")
    ap.add_argument("--steps", type=int, default=3, help="training steps per process (the first is warm-up)")
    ap.add_argument("--offset", type=int, default=0, help="which 4 ACLSum test rows make the batch")
    ap.add_argument("--variant", choices=["A", "B"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    set_bench_env()
    if args.variant:
        return worker(args)
    import subprocess

    res = {"A": [], "B": []}
    for i in range(args.rounds):
        for v in ("A", "B") if i % 2 == 0 else ("B", "A"):
            cmd = [PY, __file__, "--variant", v, "--steps", str(args.steps), "--offset", str(args.offset)] + \
                  (["--full"] if args.full else [])
            load = loadavg()
            out = subprocess.run(cmd, capture_output=True, text=True, env=bench_env(), cwd=REPO, timeout=1800)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("MICRO_RESULT ")), None)
            if line is None:
                print(out.stderr[-2000:])
                raise SystemExit(f"variant {v} failed")
            r = json.loads(line[len("MICRO_RESULT "):])
            r["load"] = load
            res[v].append(r)
            print(f"[micro_logps] round {i} {v}: steps {[round(t, 2) for t in r['step_seconds']]} s, reference "
                  f"{[round(t, 2) for t in r['ref_seconds_per_pair']]} s/pair, step-0 diff "
                  f"{r['step0_max_abs_logp_diff']:.2e}, peak RSS {r['peak_rss_mib']} MiB, load {load}", flush=True)
    med = lambda v, key: statistics.median(t for r in res[v] for t in r[key][1:])  # noqa: E731
    steady = {v: med(v, "step_seconds") for v in res}
    ref = {v: med(v, "ref_seconds_per_pair") for v in res}
    peak = {v: statistics.median(r["peak_rss_mib"] for r in rs) for v, rs in res.items()}
    summary = {"full": args.full, "train_batch_shape_A": res["A"][0]["train_shape"],
               "step0_max_abs_logp_diff": {v: max(r["step0_max_abs_logp_diff"] for r in rs) for v, rs in res.items()},
               "median_step_seconds": steady, "median_ref_seconds_per_pair": ref, "median_peak_rss_mib": peak,
               "step_time_ratio_B_over_A": round(steady["B"] / steady["A"], 3),
               "ref_time_ratio_B_over_A": round(ref["B"] / ref["A"], 3),
               "peak_rss_ratio_B_over_A": round(peak["B"] / peak["A"], 3), "load_before": [r["load"] for v in res
                                                                                         for r in res[v]]}
    print("[micro_logps] " + json.dumps(summary), flush=True)
    out = REPO / "benchmarks/results" / f"micro_logps-per-sequence{'-full' if args.full else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "runs": res}, indent=2))


if __name__ == "__main__":
    main()
