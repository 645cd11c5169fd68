"""Stage 4: the DPO model against the SFT baseline on held-out prompts, as a report.

    python 04_evaluate/evaluate.py --config configs/quickstart/04_evaluate.yaml
    python 04_evaluate/evaluate.py --config configs/quickstart/04_evaluate.yaml --set data.limit=20 --force
    python 04_evaluate/evaluate.py --config configs/gpu/04_evaluate.yaml --dry-run   # plan only, no GPU needed

Reads the final model from stage 3's manifest (`dpo_dir`) and the judge, filters and pairing rule from stage 2's
(`judge_dir`; or from this config with `judge_dir: null`). Generates one response per held-out prompt with each model
(greedy by default: stage 1's generation code, one Ray Data pipeline and one vLLM engine per model, one model at a
time on the same Ray), takes `others` given as a jsonl of outputs as they are, scores every response with the judge,
decides each prompt's DPO-vs-baseline match with the pairing rule (common.report), and writes
`<output_dir>/04_evaluate/`: report.md (the table, the bar, side-by-side examples), metrics.json, PNG plots and the
judged responses (data/). Beside the training judge, the report carries signals the model never saw (common.report):
copying of the source, a length-controlled win rate and, when the data has references (`data.columns.reference`),
ROUGE-L and embedding similarity to them and how often the judge prefers them (they are judged like a model).
Prompts, responses and judged rows stay on Ray Data from the read to the write (common.responses); the driver reads
back the judged table alone, one row per (prompt, model), for the report.
"""
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402

from common import report  # noqa: E402
from common import schema as S  # noqa: E402
from common.config import FilterConfig, JudgeConfig, PairingConfig, require_model, resolve  # noqa: E402
from common.data import num_blocks, prompt_ids, read_prompts, scan_prompts  # noqa: E402
from common.errors import UserError, cli  # noqa: E402
from common.generation import engine_asks, generate, tokenize_prompts  # noqa: E402
from common.io import StageOutput, fingerprint, read_manifest  # noqa: E402
from common.judges import build_judge, score_range  # noqa: E402
from common.model_check import check_max_model_len  # noqa: E402
from common.pairing import check_threshold  # noqa: E402
from common.ray_setup import Ask, check_fits, init_ray, print_plan  # noqa: E402
from common.responses import answered_by_all, as_responses, from_outputs, human_references  # noqa: E402
from common.stage import parse  # noqa: E402

STAGE = "04_evaluate"
TASK = Ask("tokenize / pre- / post-process task", 1, {"CPU": 0.25})


def upstream(folder: str, stage: str, dry_run: bool):
    """A stage's manifest; in a dry run a missing one is a note (the plan does not need it), not an error."""
    try:
        return read_manifest(folder, stage)
    except UserError as e:
        if not dry_run:
            raise
        print(f"[{STAGE}] note: {e}", flush=True)
        return None


def dpo_model(manifest: dict, folder: str) -> str:
    path = manifest.get("model")
    if not path:
        raise UserError(f"{folder}: stage 3's manifest names no final model (training did not finish?); "
                        f"rerun 03_dpo_train/train.py with --force")
    return require_model(path, f"{folder}/manifest.json: model")


def read_outputs(path: str, name: str, ids: list[str], where: str) -> dict[str, str]:
    """{prompt id: response} from another system's jsonl of {"id", "response"}; every prompt must be answered."""
    p = resolve(path)
    if not p.is_file():
        raise UserError(f"{where}: outputs file {path} of model '{name}' not found")
    try:
        df = pd.read_json(p, lines=True, dtype=False)
    except ValueError as e:
        raise UserError(f"{where}: cannot parse {path} ({str(e).splitlines()[0][:100]}); "
                        f"expected one {{\"id\": ..., \"response\": ...}} per line") from None
    if not {"id", "response"} <= set(df.columns):
        raise UserError(f"{where}: {path} has columns {list(df.columns)}; it needs `id` and `response`")
    ids_read = df["id"].astype(str)
    if (repeated := ids_read[ids_read.duplicated()]).size:  # else the last answer would silently win
        i = repeated.index[0]
        first = ids_read[ids_read == repeated.iloc[0]].index[0]
        raise UserError(f"{where}: {path} answers id {repeated.iloc[0]} twice (lines {first + 1} and {i + 1}); "
                        f"keep one response per id")
    got = dict(zip(ids_read, df["response"].fillna("").astype(str)))
    missing = [i for i in ids if i not in got]
    if missing:
        raise UserError(f"{where}: {path} has no response for {len(missing)} of the {len(ids)} prompts "
                        f"(e.g. id {missing[0]}); answer every prompt id of data.path, or lower data.limit")
    return {i: got[i] for i in ids}


def judge_settings(cfg, where: str, dry_run: bool):
    """(judge, filters, pairing rule, stage 2's manifest): stage 2's, or the config's own with judge_dir: null."""
    if not cfg.judge_dir:  # no stage-2 run (DPO on your own pairs): the config's blocks, checked as stage 2 would
        judge, pairing = cfg.judge or JudgeConfig(), cfg.pairing or PairingConfig()
        check_threshold(judge, pairing, *score_range(judge), where)
        return judge, cfg.filters or FilterConfig(), pairing, None
    m = upstream(cfg.judge_dir, "02_judge", dry_run)
    if m is None:
        return None, None, None, None
    c = m["config"]
    sim = c["judge"].get("similarity") or {}
    if "copy_penalty" not in sim:  # a stage 2 from before the copy penalty judged by cosine alone: judge as it did
        c["judge"]["similarity"] = {**sim, "copy_penalty": 0.0}
    return (JudgeConfig.model_validate(c["judge"]), FilterConfig.model_validate(c["filters"]),
            PairingConfig.model_validate(c["pairing"]), m)


def bar(targets: list[dict]) -> str:
    return "".join(f"{'PASS' if t['pass'] else 'FAIL'}: {t['check']}\n" for t in targets)


def trained_prompt(judge_m: dict):
    """Stage 1's prompt config (stage 2's input), to check the evaluation asks the same thing; None if unknown."""
    try:
        return read_manifest((judge_m.get("input") or {})["dir"], "01_generate")["config"]["prompt"]
    except (KeyError, TypeError, UserError):
        return None


@cli
def main() -> None:
    args, cfg = parse(STAGE, __doc__)
    # Stage 4 uses exactly stage 2's judge, filters and pairing rule: read them from its manifest.
    judge_cfg, filters, pairing, judge_m = judge_settings(cfg, args.config, args.dry_run)
    dpo_m = upstream(cfg.dpo_dir, "03_dpo_train", args.dry_run)
    judge = build_judge(judge_cfg) if judge_cfg else None

    # One model generates at a time (its engine stops before the next starts), then the judge scores them all.
    gen_asks = engine_asks(cfg.engine, "vLLM engine (one model at a time)") + [TASK]
    judge_asks = (judge.asks() if judge else []) + [TASK]
    print_plan(f"{STAGE}: generation", gen_asks, cfg.ray)
    print_plan(f"{STAGE}: judge ({judge_cfg.type if judge_cfg else f'read from {cfg.judge_dir} at run time'})",
               judge_asks, cfg.ray)
    if args.dry_run:
        return
    check_fits(STAGE, gen_asks, cfg.ray)
    check_fits(STAGE, judge_asks, cfg.ray)
    report.embedder_path(judge_cfg)  # the report's embedder: missing, it would fail only after generation

    # Who is compared: the DPO model, the baseline, the others; a model folder generates, an outputs file is read.
    prompts = scan_prompts(cfg.data, cfg.prompt, args.config, cfg.engine.concurrency)  # checked; still on disk
    empty = prompts.empty
    outputs = [m for m in [cfg.baseline, *cfg.others] if m.outputs]
    ids = prompt_ids(prompts) if outputs else []  # ids only, to check each outputs file answers every prompt
    systems = [("dpo", dpo_model(dpo_m, cfg.dpo_dir), None)]
    for m in [cfg.baseline, *cfg.others]:
        where = f"{args.config}: {'baseline' if m is cfg.baseline else 'others'} '{m.name}'"
        systems.append((m.name, require_model(m.path, where), None) if m.path else
                       (m.name, None, read_outputs(m.outputs, m.name, ids, args.config)))
    for name, path, _ in systems:
        if path:
            check_max_model_len(path, cfg.model.max_model_len, f"{args.config}: model '{name}'")
    names = [n for n, _, _ in systems]
    if report.REFERENCE_SYSTEM in names:
        raise UserError(f"{args.config}: the name '{report.REFERENCE_SYSTEM}' is the human references' column in the "
                        f"report; call the model something else")

    # Reuse only if nothing it read changed: both manifests, the prompts and every outputs file.
    inputs = [dpo_m["fingerprint"], dpo_m["created"], fingerprint(resolve(cfg.data.path))] + \
        [judge_m[k] for k in ("fingerprint", "created") if judge_m] + \
        [fingerprint(resolve(m.outputs)) for m in outputs]
    up = {"dir": dpo_m["dir"], "fingerprint": hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]}
    out = StageOutput(cfg, STAGE, upstream=up, force=args.force)
    if (done := out.reusable()):
        print(f"\n{done['table']}\n\n{bar(done.get('targets', []))}", flush=True)
        print(f"[{STAGE}] Report: {done['dir']}/report.md", flush=True)
        return

    init_ray(cfg.ray)

    # Every model's responses stay on Ray (the object store), one model's engine at a time: see common.responses.
    t0, parts, skipped, gen_seconds = time.time(), [], {}, {}
    prompt_rows = read_prompts(prompts).materialize()  # the prompt rows, read by Ray's tasks, once for every model
    for name, path, answers in systems:
        if answers is not None:
            parts.append(from_outputs(prompt_rows, name, answers))
            continue
        t = time.time()
        model = cfg.model.model_copy(update={"path": path})
        generated = generate(tokenize_prompts(prompt_rows, model, cfg.sampling.max_tokens), model, cfg.engine,
                             cfg.sampling)
        parts.append(as_responses(generated, name).materialize())  # the engine stops before the next model's starts
        skipped[name] = len(prompts) - parts[-1].count()  # a prompt too long for the context gets no response
        gen_seconds[name] = round(time.time() - t, 1)
        print(f"[{STAGE}] {name}: {len(prompts) - skipped[name]} responses in {gen_seconds[name]:.0f}s "
              f"(engine start included)", flush=True)

    # Compare like with like: only prompts every model answered (a prompt too long for one model is dropped).
    blocks = num_blocks(len(prompts) * (len(names) + 1) // 8, max(a.count for a in judge_asks))
    table = answered_by_all(parts[0].union(*parts[1:], human_references(prompt_rows)), names, blocks).materialize()
    if not table.count():
        raise UserError(f"{args.config}: no prompt was answered by every model (all too long for one of them?); "
                        f"raise model.max_model_len or lower sampling.max_tokens")

    out.begin()
    t = time.time()
    judge.score(table).write_parquet(str(out.data))
    judge_seconds = time.time() - t
    # The report's table: one row per (held-out prompt, model), a prompt's rows together, in prompt-id order.
    df = pd.read_parquet(out.data).sort_values(S.PROMPT_ID, kind="stable")
    common = df[S.PROMPT_ID].nunique()

    # Metrics, plots, report.md, metrics.json: all beside data/, so they land with the output.
    notes = [f"{n}: {k} of {len(prompts)} prompts were too long for the context and skipped" for n, k in
             skipped.items() if k]
    if judge_m and (trained := trained_prompt(judge_m)) and trained != cfg.prompt.model_dump():
        notes.append(f"the prompt differs from stage 1's, which the DPO pairs were made with ({trained}): "
                     f"the comparison is off the trained task")
    if empty:
        notes.append(f"{empty} rows of {cfg.data.path} have an empty text and were dropped")
    if common < len(prompts):
        notes.append(f"{len(prompts) - common} prompts not answered by every model are left out everywhere")
    metrics, table = report.assemble(
        out.tmp, df, names, cfg, judge=judge_cfg, filters=filters, pairing=pairing, dpo_manifest=dpo_m,
        notes=notes, models_used={n: p or "outputs file" for n, p, _ in systems}, embed=report.embedder(judge_cfg))
    stats = {"prompts": common, "prompts_dropped": {"empty_text": empty}, "generate_seconds": gen_seconds,
             "judge_seconds": round(judge_seconds, 1),
             "win_rate": {n: w.get("win_rate") for n, w in metrics["win_rate"].items()}}
    references = int((df[S.SYSTEM] == report.REFERENCE_SYSTEM).sum())
    manifest = out.commit(rows={"responses": len(df) - references, "references": references}, stats=stats,
                          judge_dir=judge_m["dir"] if judge_m else None,
                          table=table, targets=metrics["targets"], report=str(out.final / "report.md"),
                          metrics_file=str(out.final / "metrics.json"))
    print(f"\n{table}\n\n{bar(metrics['targets'])}", flush=True)
    print(f"[{STAGE}] {len(names)} models x {common} prompts (+ {references} human references) judged in "
          f"{time.time() - t0:.0f}s "
          f"({empty} prompts dropped for an empty text). "
          f"Report: {manifest['dir']}/report.md", flush=True)


if __name__ == "__main__":
    main()
