"""Stage 1 (vLLM on Ray Data) against (a) HF transformers `generate` and (b) bare vLLM `LLM.generate`, in one run.

    .venv/bin/python benchmarks/bench_generate.py                 # full size: 100 ACLSum abstracts x n=4, 96 tokens
    .venv/bin/python benchmarks/bench_generate.py --limit 32      # 32 abstracts x 4, the same four runs
    .venv/bin/python benchmarks/bench_generate.py --limit 8       # harness smoke test

Same model (models/smollm2-135m-instruct, bf16), same prompts (every ACLSum train abstract through stage 1's prompt
template and the tokenizer's chat template: the token ids come from `common.tokenize.prompt_ids`, as in stage 1),
n=4 candidates, max_tokens=96, temperature 0.8, top_p 0.95, same 2 cores. Each engine runs in its own subprocess,
one after the other, so none shares threads or memory with another; the load average is recorded next to each.

  (a) HF: `model.generate`, batched (prompts sorted by length, 16 prompts x num_return_sequences=4 = 64 sequences
      per batch, left padding), sampling; run twice, with 1 torch thread (`--hf-threads`) and with 2 (one per
      core), and the faster of the two is the baseline: which one wins depends on the machine's load (see
      docs/benchmarks.md), so it is measured in the same invocation.
  (b) bare vLLM: one `LLM(...)` in one process, the 400 requests in one `generate` call, each with the per-candidate
      seed stage 1 uses (`common.generation.candidate_seed`), so (b) and (c) decode the very same tokens.
  (c) stage 1: `common.generation.tokenize_prompts` + `generate` on a local Ray, exactly as 01_generate/generate.py
      calls them (same config file, same engine construction `build_engine`), written to parquet.

Generated tokens/s = generated tokens (EOS counted, padding not) / generation seconds, engine start excluded:
  (a) the `generate` calls; model load reported separately.
  (b) the `LLM.generate` call; `LLM(...)` construction reported as engine start.
  (c) from the first request the engine received to the end of the parquet write. The first request's time is
      vLLM's own wall-clock `arrival_time` of each request (RequestOutput.metrics, which ray.data.llm passes through
      to the row): stage 1's postprocess (`_candidate_row`) is wrapped, in this process, to copy it into the output
      rows; the minimum over rows is when generation began. Everything before that - Ray Data start, the engine
      actor's start and vLLM init - is reported as start-up. Nothing in common/ is edited.

Both vLLM runs get engine_kwargs {enable_chunked_prefill: false}: with vLLM 0.32 on CPU a seeded request whose
prefill is split across steps crashes the engine (`RuntimeError: CPU Generator does not use offset`, see
docs/benchmarks.md), and stage 1 seeds every candidate. `--chunked-prefill` runs without the workaround.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (PY, REPO, bench_env, emit, loadavg, machine, result_marker_json, run_logged,  # noqa: E402
                     save, set_bench_env, versions)

CONFIG = REPO / "configs/quickstart/01_generate.yaml"
NO_CHUNKED = {"enable_chunked_prefill": False}


def _cfg(args, extra_sets=()):
    from common.config import load_config

    sets = [f"sampling.n={args.n}", f"sampling.max_tokens={args.max_tokens}", *extra_sets]
    # 0 = every prompt of the split: the quickstart config's own data.limit is lifted, not inherited
    sets.append(f"data.limit={args.limit or 'null'}")
    kwargs = {} if args.chunked_prefill else dict(NO_CHUNKED)
    kwargs.update(json.loads(args.engine_kwargs or "{}"))
    for k, v in kwargs.items():
        sets.append(f"engine.engine_kwargs.{k}={json.dumps(v)}")
    return load_config("01_generate", str(CONFIG), sets)


def _prompts(cfg):
    """Stage 1's prompt rows and their token ids (the same `prompt_ids` stage 1's tokenize step calls)."""
    from common.data import load_prompts
    from common.tokenize import load_tokenizer, prompt_ids

    rows, _ = load_prompts(cfg.data, cfg.prompt, str(CONFIG))
    tok = load_tokenizer(cfg.model.path)
    budget = cfg.model.max_model_len - cfg.sampling.max_tokens
    out = []
    for r in rows:
        ids = prompt_ids(tok, r["prompt"])
        if len(ids) <= budget:  # stage 1 skips (and counts) longer prompts
            out.append((r["prompt_id"], ids))
    return out, tok


# ---------------------------------------------------------------------------------------------------- (a) HF
def worker_hf(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    cfg = _cfg(args)
    prompts, tok = _prompts(cfg)
    torch.manual_seed(cfg.sampling.seed)
    if args.hf_threads:
        torch.set_num_threads(args.hf_threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=getattr(torch, cfg.model.dtype)).eval()
    load_s = time.perf_counter() - t0
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos))
    order = sorted(prompts, key=lambda p: len(p[1]))
    bp = args.hf_batch_prompts
    tokens, seqs, padded_steps = 0, 0, 0
    t1 = time.perf_counter()
    for i in range(0, len(order), bp):
        chunk = [ids for _, ids in order[i:i + bp]]
        width = max(len(x) for x in chunk)
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
        attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True,
                                 temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, top_k=0,
                                 max_new_tokens=cfg.sampling.max_tokens, num_return_sequences=cfg.sampling.n,
                                 pad_token_id=pad)
        new = out[:, width:].tolist()
        padded_steps += len(new[0]) if new else 0
        for row in new:
            n = len(row)
            for j, t in enumerate(row):
                if t in eos:
                    n = j + 1
                    break
            tokens += n
            seqs += 1
        print(f"[hf] batch {i // bp + 1}/{(len(order) + bp - 1) // bp}: {len(chunk)} prompts, width {width}, "
              f"{time.perf_counter() - t1:.0f}s so far", flush=True)
    gen_s = time.perf_counter() - t1
    emit({"engine": "hf", "prompts": len(prompts), "sequences": seqs, "generated_tokens": tokens,
          "generation_seconds": round(gen_s, 2), "start_seconds": round(load_s, 2),
          "tokens_per_second": round(tokens / gen_s, 2), "torch_threads": torch.get_num_threads(),
          "batch_prompts": bp, "decode_steps": padded_steps})


# -------------------------------------------------------------------------------------------- (b) bare vLLM
def worker_vllm(args) -> None:
    import os

    from common.generation import _cpu_env, candidate_seed

    cfg = _cfg(args)
    os.environ.update(_cpu_env(cfg.engine))  # the env stage 1 gives its engine actor (KV cache, reserved cores)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts, _ = _prompts(cfg)
    s = cfg.sampling
    reqs, params = [], []
    for pid, ids in prompts:
        for k in range(s.n):
            reqs.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                                         stop=list(s.stop) or None, seed=candidate_seed(s.seed, pid, k)))
    # The engine arguments stage 1's build_engine gives vLLM on CPU.
    kw = dict(max_model_len=cfg.model.max_model_len, dtype=cfg.model.dtype, max_num_seqs=cfg.engine.max_num_seqs,
              tensor_parallel_size=1, enforce_eager=True, trust_remote_code=cfg.model.trust_remote_code,
              **cfg.engine.engine_kwargs)
    t0 = time.perf_counter()
    llm = LLM(cfg.model.path, **kw)
    start_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    outs = llm.generate(reqs, params, use_tqdm=False)
    gen_s = time.perf_counter() - t1
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    emit({"engine": "vllm", "prompts": len(prompts), "sequences": len(outs), "generated_tokens": tokens,
          "generation_seconds": round(gen_s, 2), "start_seconds": round(start_s, 2),
          "tokens_per_second": round(tokens / gen_s, 2), "engine_kwargs": kw})


# --------------------------------------------------------------------------------------------- (c) stage 1
def worker_stage1(args) -> None:
    import pandas as pd

    from common import generation as G
    from common import schema as S
    from common.data import read_prompts, scan_prompts
    from common.ray_setup import init_ray

    extra = ["ray.env_vars.VLLM_LOGGING_LEVEL=INFO"]  # so the engine's CPU binding line reaches our log
    if args.stage1_fix:  # what bare LLM.generate does: no per-step stats logging ...
        extra.append("engine.engine_kwargs.disable_log_stats=true")
    if args.batch_size:
        extra.append(f"engine.batch_size={args.batch_size}")
    cfg = _cfg(args, extra)
    t_begin = time.time()
    init_ray(cfg.ray)
    import ray

    t_ray = time.time()
    prompts = scan_prompts(cfg.data, cfg.prompt, str(CONFIG), cfg.engine.concurrency)

    original = G._candidate_row

    def stamped_candidate_row(row, max_tokens, carry):  # stage 1's postprocess + timing columns
        out = original(row, max_tokens, carry)
        metrics = row.get("metrics") or {}
        out["bench_arrival"] = float(metrics.get("arrival_time") or "nan")  # vLLM: request reached the engine
        out["bench_t_post"] = time.time()
        out["bench_time_taken_llm"] = float(row.get("time_taken_llm", -1.0))
        return out

    G._candidate_row = stamped_candidate_row  # looked up when generate() builds its postprocess lambda
    if args.stage1_fix:  # ... and only the final output of each request (LLM.generate sets FINAL_ONLY; ray.data.llm
        # leaves vLLM's default CUMULATIVE: a RequestOutput per request per step, through the async frontend)
        from vllm.sampling_params import RequestOutputKind

        original_sampling_row = G._sampling_row

        def final_only_sampling_row(row, sampling, seed):
            row = original_sampling_row(row, sampling, seed)
            row["sampling_params"]["output_kind"] = RequestOutputKind.FINAL_ONLY
            return row

        G._sampling_row = final_only_sampling_row

    # From here on, what 01_generate/generate.py does.
    t0 = time.time()
    tokenized = G.tokenize_prompts(read_prompts(prompts), cfg.model, cfg.sampling.max_tokens).materialize()
    skipped = tokenized.filter(lambda r: bool(r[S.SKIP])).select_columns(["prompt_id", S.SKIP]).take_all()
    t_tok = time.time()
    out_dir = Path(args.workdir) / "stage1_out"
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    G.generate(tokenized, cfg.model, cfg.engine, cfg.sampling, carry=()).write_parquet(str(out_dir))
    t_end = time.time()
    df = pd.read_parquet(out_dir)
    first_req = float(df["bench_arrival"].min())
    last_post = float(df["bench_t_post"].max())
    tokens = int(df["num_response_tokens"].sum())
    gen_s = t_end - first_req
    emit({"engine": "stage1", "prompts": len(prompts) - len(skipped), "sequences": len(df),
          "generated_tokens": tokens, "generation_seconds": round(gen_s, 2),
          "start_seconds": round(first_req - t_tok, 2), "ray_init_seconds": round(t_ray - t_begin, 2),
          "tokenize_seconds": round(t_tok - t0, 2), "pipeline_seconds": round(t_end - t_tok, 2),
          "tokens_per_second": round(tokens / gen_s, 2),
          "tokens_per_second_incl_startup": round(tokens / (t_end - t_tok), 2),
          "tokenized_blocks": tokenized.num_blocks(),
          # rows reach the postprocess only when their engine task ends: the spread of these stamps shows how
          # much of the output streamed out before the end
          "postprocess_stamps_first_last_s": [round(float(df["bench_t_post"].min()) - first_req, 2),
                                             round(last_post - first_req, 2)],
          "last_arrival_s": round(float(df["bench_arrival"].max()) - first_req, 2),
          "batch_size": cfg.engine.batch_size, "engine_kwargs": cfg.engine.engine_kwargs})
    ray.shutdown()


# -------------------------------------------------------------------------------------------------- driver
BIND_RE = re.compile(r"core ids=\[([^\]]*)\]")
RESV_RE = re.compile(r"reserved_cpus=\[([^\]]*)\]")


def _binding(log: Path) -> dict:
    text = log.read_text(errors="replace")
    core = BIND_RE.findall(text)
    resv = RESV_RE.findall(text)
    return {"omp_core_ids": core[-1] if core else None, "reserved_cpus": resv[-1] if resv else None,
            "chunked_prefill_crash": "CPU Generator does not use offset" in text}


def run(name: str, worker: str, args, logs: Path, extra_env: dict | None = None, extra_args=()) -> dict:
    cmd = [PY, str(Path(__file__).resolve()), "--worker", worker, "--n", str(args.n),
           "--max-tokens", str(args.max_tokens), "--workdir", str(args.workdir),
           "--hf-batch-prompts", str(args.hf_batch_prompts), "--hf-threads", str(args.hf_threads), *extra_args]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    if args.chunked_prefill:
        cmd.append("--chunked-prefill")
    load0 = loadavg()
    t0 = time.time()
    rc, wall, sampler = run_logged(cmd, logs / f"{name}.log", bench_env(**(extra_env or {})), args.timeout,
                                   sample_memory=True)
    res = {"name": name, "rc": rc, "process_seconds": round(wall, 2), "load_before": load0, "load_after": loadavg(),
           "started": datetime.datetime.fromtimestamp(t0).strftime("%H:%M:%S"), **_binding(logs / f"{name}.log"),
           # CPU seconds per process over the whole run (start-up included): where the 2 cores went
           "cpu_seconds_by_process": sampler.cpu_by_process()}
    r = result_marker_json(logs / f"{name}.log")
    if rc != 0 or r is None:
        res["error"] = f"exit {rc}; see {logs / (name + '.log')}"
    else:
        res.update(r)
    keys = ("name", "rc", "generated_tokens", "generation_seconds", "start_seconds", "tokens_per_second",
            "torch_threads", "omp_core_ids", "reserved_cpus", "load_before", "error")
    print("[bench_generate] " + json.dumps({k: res[k] for k in keys if k in res}), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--limit", type=int, default=0, help="first N prompts only (0 = all, as the benchmark asks)")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--hf-batch-prompts", type=int, default=16, help="(a): prompts per generate call (x n seqs)")
    ap.add_argument("--hf-threads", type=int, default=1,
                    help="(a): torch threads of the `a` run (default 1; `a2` is HF with 2); 0 = torch's default "
                         "(one per core)")
    ap.add_argument("--plan", default="b,c,a,a2",
                    help="runs in order, comma-separated: a (HF, --hf-threads), a2 (HF, 2 torch threads), b (bare "
                         "vLLM), c (stage 1), cf (stage 1 with the "
                         "fix proposed in docs/benchmarks.md), br0 / cr0 (b / c with VLLM_CPU_NUM_OF_RESERVED_CPU=0, "
                         "i.e. 2 OMP threads; the same as b / c when the config sets engine.cpu_reserved_cores: 0, as "
                         "the quickstart does). E.g. b,c,cf,cf,c,b for an interleaved A/B")
    ap.add_argument("--chunked-prefill", action="store_true", help="leave vLLM's chunked prefill on (crashes)")
    ap.add_argument("--engine-kwargs", default="", help="extra engine kwargs, json, for (b) and (c)")
    ap.add_argument("--workdir", default="/tmp/bench_generate")
    ap.add_argument("--out", default=None, help="results json (default benchmarks/results/generate-<date>.json)")
    ap.add_argument("--timeout", type=int, default=1500, help="per run, seconds")
    ap.add_argument("--worker", choices=["hf", "vllm", "stage1"], help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--stage1-fix", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    set_bench_env()
    if args.worker:
        return {"hf": worker_hf, "vllm": worker_vllm, "stage1": worker_stage1}[args.worker](args)

    logs = Path(args.workdir) / "logs"
    t_all = time.perf_counter()
    print(f"[bench_generate] plan {args.plan}; logs in {logs}; load {loadavg()}", flush=True)
    two = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    kinds = {  # plan token -> (run name prefix, worker, extra env, extra worker args)
        "a": ("a_hf", "hf", None, []),
        "a2": ("a2_hf_2threads", "hf", None, ["--hf-threads", "2"]),
        "b": ("b_vllm", "vllm", None, []),
        "c": ("c_stage1", "stage1", None, []),
        "cf": ("cf_stage1_fixed", "stage1", None, ["--stage1-fix"]),
        "br0": ("br0_vllm_reserved0", "vllm", two, []),
        "cr0": ("cr0_stage1_reserved0", "stage1", two, []),
    }
    runs, seen = [], {}
    for tok in [t.strip() for t in args.plan.split(",") if t.strip()]:
        if tok not in kinds:
            raise SystemExit(f"--plan: unknown run '{tok}' (known: {', '.join(kinds)})")
        prefix, worker, env, extra = kinds[tok]
        k = seen[tok] = seen.get(tok, -1) + 1
        runs.append(run(f"{prefix}_{k}", worker, args, logs, extra_env=env, extra_args=extra))

    def med(pattern):
        vals = [r["tokens_per_second"] for r in runs if re.fullmatch(pattern, r["name"]) and "error" not in r]
        return round(statistics.median(vals), 2) if vals else None

    a1, a2 = med(r"a_hf_\d+"), med(r"a2_hf_2threads_\d+")
    a = max((x for x in (a1, a2) if x is not None), default=None)  # HF at its best of this invocation
    b, c = med(r"b_vllm_\d+"), med(r"c_stage1_\d+")
    cf, br0, cr0 = med(r"cf_stage1_fixed_\d+"), med(r"br0_vllm_reserved0_\d+"), med(r"cr0_stage1_reserved0_\d+")
    ratio = lambda x, y: round(x / y, 3) if x is not None and y else None  # noqa: E731
    summary = {"tokens_per_second_median": {"a_hf": a1, "a2_hf_2threads": a2, "a_hf_best": a, "b_vllm": b,
                                            "c_stage1": c, "cf_stage1_fixed": cf, "br0_vllm_2_omp_threads": br0,
                                            "cr0_stage1_2_omp_threads": cr0},
               "ratio_c_over_a": ratio(c, a), "ratio_c_over_a_1thread": ratio(c, a1),
               "ratio_c_over_a_2threads": ratio(c, a2), "ratio_c_over_b": ratio(c, b),
               "ratio_cf_over_b": ratio(cf, b), "ratio_cf_over_c": ratio(cf, c), "ratio_cf_over_a": ratio(cf, a)}
    targets = {"ratio_c_over_a": 5.0, "ratio_c_over_b": 0.95}
    result = {
        "benchmark": "bench_generate", "date": datetime.date.today().isoformat(), "machine": machine(),
        "versions": versions(), "n": args.n, "max_tokens": args.max_tokens, "limit": args.limit or None,
        "total_seconds": round(time.perf_counter() - t_all, 1), "runs": runs, "summary": summary,
        "targets": {k: {"target": v, "measured": summary[k],
                        "met": summary[k] is not None and summary[k] >= v} for k, v in targets.items()},
    }
    print("\n[bench_generate] generated tokens/s (engine start excluded):", flush=True)
    for r in runs:
        if "error" in r:
            print(f"    {r['name']:<22} ERROR {r['error']}", flush=True)
            continue
        print(f"    {r['name']:<22} {r['tokens_per_second']:>8.1f} tok/s  {r['generated_tokens']} tokens in "
              f"{r['generation_seconds']:.1f}s; start {r['start_seconds']:.1f}s; OMP cores [{r['omp_core_ids']}] "
              f"reserved [{r['reserved_cpus']}]; load {r['load_before']}", flush=True)
    print(f"    (c)/(a) = {summary['ratio_c_over_a']}  (target >= {targets['ratio_c_over_a']:g}; (a) = HF's best of "
          f"1 thread {a1} and 2 threads {a2} tok/s)", flush=True)
    print(f"    (c)/(b) = {summary['ratio_c_over_b']}  (target >= {targets['ratio_c_over_b']:g})", flush=True)
    if cf is not None:
        print(f"    with the proposed fix: (cf)/(b) = {summary['ratio_cf_over_b']}, (cf)/(a) = "
              f"{summary['ratio_cf_over_a']}, (cf)/(c) = {summary['ratio_cf_over_c']}", flush=True)
    save(result, args.out, "generate")


if __name__ == "__main__":
    main()
