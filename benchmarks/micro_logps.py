"""Micro-benchmark behind a recommended stage-3 fix: score response tokens only.

    .venv/bin/python benchmarks/micro_logps.py            # LoRA (quickstart), 4 pairs per step, A/B interleaved
    .venv/bin/python benchmarks/micro_logps.py --full     # full fine-tuning

Stage 3's trainer step (common/train_loop.py) runs `model(ids).logits` - the LM head over every position of the
batch, prompt and padding included - and `common.dpo_loss.sequence_logps` then makes a float32 copy of each row's
[seq, vocab] logits for logsumexp. With SmolLM2's 49k vocabulary that is most of the step's memory beyond the
weights. Variant B runs the backbone, keeps the hidden states of the positions whose next token is a response token
(`loss_mask[:, 1:]`), and applies the LM head and log-softmax to those rows only (what TRL 1.16's fused LM head
does). Both variants train the same model on the same batch with the same loss; the script checks that their summed
log-probs agree, then times forward + log-probs + backward + AdamW step, interleaving A and B in fresh processes so
that each peak RSS (VmHWM) belongs to one variant. One torch thread, as the stage-3 trainer uses.
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


def response_only_logps(model, ids, attn, mask):
    """Variant B: LM head and log-softmax on response positions only. Returns (summed logps [2B], counts [2B])."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = inner.model(input_ids=ids, attention_mask=attn).last_hidden_state  # [N, T, H]
    sel = mask[:, 1:].bool()  # position t predicts token t+1: keep t where t+1 is a response token
    rows = sel.nonzero(as_tuple=True)[0]
    h = hidden[:, :-1][sel]  # [K, H]
    targets = ids[:, 1:][sel]  # [K]
    logits = inner.lm_head(h).float()  # [K, V]: K response tokens instead of N*T positions
    tok = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    summed = torch.zeros(ids.shape[0], dtype=tok.dtype).index_add_(0, rows, tok)
    return summed, sel.sum(1)


def worker(args) -> None:
    import torch

    from common.config import load_config
    from common.dpo_loss import dpo_loss, sequence_logps
    from common.tokenize import collate_pairs, load_tokenizer, tokenize_pair
    from common.train_loop import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    sets = ["train_path=x"] + (["lora_config=null"] if args.full else [])
    cfg = load_config("03_dpo_train", str(REPO / "configs/quickstart/03_dpo_train.yaml"), sets)
    model = build_model(cfg, getattr(torch, cfg.dtype))
    tok = load_tokenizer(cfg.model_id)
    rows = [json.loads(line) for line in open(REPO / "data/aclsum/test.jsonl")][args.offset:args.offset + 4]
    pairs = []
    for r in rows:
        prompt = [{"role": "user", "content": "Summarize in one sentence.\n\n" + r["summary"]}]
        pairs.append(tokenize_pair(tok, prompt, r["summary"].split(". ")[0].rstrip(".") + ".", r["summary"],
                                   cfg.context_length, cfg.max_prompt_length))
    ids, attn, mask = collate_pairs([p["prompt_ids"] for p in pairs], [p["chosen_ids"] for p in pairs],
                                    [p["rejected_ids"] for p in pairs], 0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    ref = None
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        if args.variant == "A":
            logits = model(ids, attention_mask=attn).logits
            logps, n = sequence_logps(logits, ids, mask)
        else:
            logps, n = response_only_logps(model, ids, attn, mask)
        if ref is None:
            ref = logps.detach().clone()
        losses, _, _ = dpo_loss(logps[:4], logps[4:], ref[:4], ref[4:], beta=0.1)
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print("MICRO_RESULT " + json.dumps({
        "variant": args.variant, "full": args.full, "shape": list(ids.shape), "step_seconds": times,
        "peak_rss_mib": round(_hwm_mib(), 1), "first_logps": [round(x, 3) for x in ref.tolist()]}), flush=True)


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
            print(f"[micro_logps] round {i} {v}: steps {[round(t, 2) for t in r['step_seconds']]} s, peak RSS "
                  f"{r['peak_rss_mib']} MiB, load {load}", flush=True)
    a0, b0 = res["A"][0]["first_logps"], res["B"][0]["first_logps"]
    diff = max(abs(x - y) for x, y in zip(a0, b0))
    steady = {v: statistics.median(t for r in rs for t in r["step_seconds"][1:]) for v, rs in res.items()}
    peak = {v: statistics.median(r["peak_rss_mib"] for r in rs) for v, rs in res.items()}
    summary = {"full": args.full, "batch_shape": res["A"][0]["shape"], "max_abs_logp_diff_A_vs_B": round(diff, 4),
               "median_step_seconds": steady, "median_peak_rss_mib": peak,
               "step_time_ratio_B_over_A": round(steady["B"] / steady["A"], 3),
               "peak_rss_ratio_B_over_A": round(peak["B"] / peak["A"], 3)}
    print("[micro_logps] " + json.dumps(summary), flush=True)
    out = REPO / "benchmarks/results" / f"micro_logps{'-full' if args.full else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "runs": res}, indent=2))


if __name__ == "__main__":
    main()
