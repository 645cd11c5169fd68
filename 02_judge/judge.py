"""Stage 2: score stage 1's candidates with a judge and pair them into a preference dataset (TRL format).

    python 02_judge/judge.py --config configs/quickstart/02_judge.yaml
    python 02_judge/judge.py --config configs/quickstart/02_judge.yaml --set pairing.min_length_gap=5 --force
    python 02_judge/judge.py --config configs/gpu/02_judge.yaml --dry-run   # plan only, no GPU needed

Reads `<output_dir>/01_generate/`, scores every candidate with the judge named by `judge.type` (similarity: MiniLM
on CPU; quiz, rubric: a judge LLM through vLLM on Ray Data), removes what `filters` reject, and pairs the rest with
the `pairing` rule. Writes `<output_dir>/02_judge/`: the pairs under data/ (prompt, chosen, rejected as chat
messages, plus both scores and lengths), candidates.parquet (every candidate, its score and why it was filtered),
scores.png, length_gap.png and manifest.json.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import schema as S  # noqa: E402
from common.errors import UserError, cli  # noqa: E402
from common.filters import FILTER_REASON, filter_reasons  # noqa: E402
from common.io import StageOutput, read_manifest  # noqa: E402
from common.judges import build_judge, error_counts, parse_details, score_range  # noqa: E402
from common.pairing import check_threshold, make_pairs, summarize  # noqa: E402
from common.plots import length_gap_histogram, score_histogram  # noqa: E402
from common.ray_setup import Ask, check_fits, init_ray, print_plan  # noqa: E402
from common.stage import parse  # noqa: E402

STAGE = "02_judge"


@cli
def main() -> None:
    args, cfg = parse(STAGE, __doc__)
    judge = build_judge(cfg.judge)
    asks = judge.asks() + [Ask("read / filter task", 1, {"CPU": 0.25})]
    print_plan(STAGE, asks, cfg.ray)
    check_threshold(cfg.judge, cfg.pairing, *score_range(cfg.judge), args.config)
    if args.dry_run:
        return
    check_fits(STAGE, asks, cfg.ray)
    upstream = read_manifest(cfg.input_dir, "01_generate")
    out = StageOutput(cfg, STAGE, upstream=upstream, force=args.force)
    if out.reusable():
        return

    init_ray(cfg.ray)
    import ray

    t0 = time.time()
    n = int(upstream["rows"]["candidates"])
    # Block count set at read time: an all-to-all repartition() would want a whole free CPU and can hang on 2 cores.
    blocks = max(1, min(n, 4 * max(a.count for a in asks)))
    candidates = ray.data.read_parquet(str(Path(upstream["dir"]) / "data"), override_num_blocks=blocks)
    scored = judge.score(candidates).to_pandas()  # one row per candidate: small enough for the driver
    scored = scored.sort_values([S.PROMPT_ID, S.CANDIDATE], ignore_index=True)
    seconds = time.time() - t0

    details = parse_details(scored[S.JUDGE_DETAIL])
    scored[FILTER_REASON] = filter_reasons(scored, cfg.filters)
    unparseable = int(scored[S.SCORE].isna().sum())
    kept = scored[(scored[FILTER_REASON] == "") & scored[S.SCORE].notna()]
    pairs, pair_stats = make_pairs(kept, cfg.pairing, cfg.seed)
    filtered = {r: int(c) for r, c in scored[FILTER_REASON].value_counts().items() if r}
    if not pairs:
        raise UserError(f"{args.config}: 0 pairs from {n} candidates ({sum(filtered.values())} filtered "
                        f"{filtered or ''}, {unparseable} unparseable, {pair_stats['ties_dropped']} ties): nothing for "
                        f"stage 3 to train on; lower pairing.min_length_gap or pairing.quality_margin, loosen "
                        f"filters, or sample more candidates per prompt in stage 1 (sampling.n)")

    out.begin()
    ray.data.from_items(pairs, override_num_blocks=1).write_parquet(str(out.data))
    scored.drop(columns=[S.PROMPT]).to_parquet(out.path("candidates.parquet"), index=False)
    score_histogram(scored[S.SCORE], out.path("scores.png"), f"{cfg.judge.type} judge: {n} candidates",
                    threshold=cfg.pairing.quality_threshold)
    length_gap_histogram([p[S.CHOSEN_WORDS] for p in pairs], [p[S.REJECTED_WORDS] for p in pairs],
                         out.path("length_gap.png"), f"{len(pairs)} pairs: chosen minus rejected length")
    stats = {
        "judge": cfg.judge.type, "candidates": n, "candidates_scored": n - unparseable,
        "unparseable": unparseable, "unparseable_by_reason": error_counts(details),
        "filtered": sum(filtered.values()), "filtered_by_reason": filtered, "score": summarize(scored[S.SCORE]),
        **pair_stats, "judge_details": judge.summary(details), "judge_seconds": round(seconds, 1),
    }
    manifest = out.commit(rows={"pairs": len(pairs), "candidates": n}, stats=stats)
    print(f"[{STAGE}] {cfg.judge.type} judge scored {n - unparseable} of {n} candidates in {seconds:.0f}s "
          f"({unparseable} unparseable; mean score {stats['score'].get('mean', float('nan')):.3f}); "
          f"{sum(filtered.values())} filtered {filtered or ''}; {len(pairs)} pairs from "
          f"{pair_stats['prompts_with_pairs']} of {pair_stats['prompts']} prompts "
          f"({pair_stats['pairs_by_rule']['quality']} on quality, {pair_stats['pairs_by_rule']['length']} on length; "
          f"{pair_stats['ties_dropped']} ties dropped; max {pair_stats['pairs_per_prompt_max']} per prompt); "
          f"chosen is {pair_stats['chosen_minus_rejected_words_mean']:+.1f} words and "
          f"{pair_stats['chosen_minus_rejected_score_mean']:+.3f} score vs rejected on average. "
          f"Output: {manifest['dir']}", flush=True)


if __name__ == "__main__":
    main()
