"""Stage 1: sample several candidate responses per prompt with vLLM on Ray Data.

    python 01_generate/generate.py --config configs/quickstart/01_generate.yaml
    python 01_generate/generate.py --config configs/quickstart/01_generate.yaml --set sampling.n=8 --force
    python 01_generate/generate.py --config configs/gpu/01_generate.yaml --dry-run   # plan only, no GPU needed

Reads the prompts named by `data` (the ACLSum train split by default: checked by the driver a batch at a time, then
read from the files by Ray Data's tasks: common/data.py), renders them with the model's chat template,
skips (and counts) prompts too long for the context, and writes to `<output_dir>/01_generate/`: one row per candidate
under data/ (its prompt's id, the response and its token counts), one row per generated prompt under prompts.parquet/
(the prompt, its source and reference: stored once, not once per candidate) and manifest.json.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import schema as S  # noqa: E402
from common.data import as_prompt_table, read_prompts, scan_prompts  # noqa: E402
from common.errors import UserError, cli  # noqa: E402
from common.generation import PROMPT_COLUMNS, engine_asks, generate, tokenize_prompts  # noqa: E402
from common.config import require_model, resolve  # noqa: E402
from common.io import StageOutput, fingerprint  # noqa: E402
from common.model_check import check_max_model_len  # noqa: E402
from common.per_prompt import PROMPTS_FILE  # noqa: E402
from common.ray_setup import Ask, check_fits, init_ray, print_plan  # noqa: E402
from common.stage import parse  # noqa: E402

STAGE = "01_generate"


@cli
def main() -> None:
    args, cfg = parse(STAGE, __doc__)
    asks = engine_asks(cfg.engine) + [Ask("tokenize / pre- / post-process task", 1, {"CPU": 0.25})]
    print_plan(STAGE, asks, cfg.ray)
    if args.dry_run:
        return
    check_fits(STAGE, asks, cfg.ray)
    check_max_model_len(require_model(cfg.model.path, f"{args.config}: model.path"), cfg.model.max_model_len,
                        args.config)
    prompts = scan_prompts(cfg.data, cfg.prompt, args.config, cfg.engine.concurrency)  # checked; still on disk
    source = {"dir": cfg.data.path, "fingerprint": fingerprint(resolve(cfg.data.path))}
    out = StageOutput(cfg, STAGE, upstream=source, force=args.force)
    if out.reusable():
        return

    init_ray(cfg.ray)
    import ray
    from ray.data.expressions import col

    t0 = time.time()
    # Ray's tasks read the prompts from the files, in blocks set at read time (an all-to-all repartition() would
    # want a whole free CPU and can hang on 2 cores).
    tokenized = tokenize_prompts(read_prompts(prompts), cfg.model,
                                 cfg.sampling.max_tokens).materialize()  # read twice below
    skipped = tokenized.filter(lambda r: bool(r[S.SKIP])).select_columns([S.PROMPT_ID, S.SKIP]).take_all()
    if len(skipped) == len(prompts):
        raise UserError(f"{args.config}: all {len(prompts)} prompts are longer than model.max_model_len - "
                        f"sampling.max_tokens; raise model.max_model_len or shorten the prompts")

    out.begin()
    # A prompt's text and source once, beside its candidates (which carry its id): stage 2 attaches them where a
    # step needs them, so they are not copied into the engine's rows, stage 1's files and stage 2's shuffles n times.
    (tokenized.filter(expr=col(S.SKIP) == "").select_columns([S.PROMPT_ID, *PROMPT_COLUMNS])
     .map_batches(as_prompt_table, batch_format="numpy", num_cpus=0.25).write_parquet(str(out.path(PROMPTS_FILE))))
    generate(tokenized, cfg.model, cfg.engine, cfg.sampling, carry=()).write_parquet(str(out.data))
    seconds = time.time() - t0

    written = ray.data.read_parquet(str(out.data))
    n_rows = written.count()
    tokens = int(written.sum(S.NUM_RESPONSE_TOKENS) or 0)
    truncated = written.filter(lambda r: r[S.FINISH_REASON] == "length").count()
    stats = {
        "prompts": len(prompts), "prompts_skipped": len(skipped), "prompts_dropped": {"empty_text": prompts.empty},
        "skipped": [{S.PROMPT_ID: r[S.PROMPT_ID], "reason": r[S.SKIP]} for r in skipped],
        "candidates": n_rows, "generated_tokens": tokens, "hit_max_tokens": truncated,
        "tokens_per_second": round(tokens / seconds, 1), "generate_seconds": round(seconds, 1),
    }
    manifest = out.commit(rows={"candidates": n_rows, "prompts": len(prompts) - len(skipped)}, stats=stats)
    print(f"[{STAGE}] {len(prompts) - len(skipped)} prompts x {cfg.sampling.n} candidates = {n_rows} responses, "
          f"{tokens} tokens in {seconds:.0f}s ({stats['tokens_per_second']} tokens/s, engine start included); "
          f"{len(skipped)} prompts skipped as too long, {prompts.empty} dropped for an empty text, {truncated} "
          f"responses hit max_tokens. "
          f"Output: {manifest['dir']}", flush=True)


if __name__ == "__main__":
    main()
