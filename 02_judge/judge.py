"""Stage 2: score stage 1's candidates with a judge and pair them into a preference dataset (TRL format).

    python 02_judge/judge.py --config configs/quickstart/02_judge.yaml
    python 02_judge/judge.py --config configs/quickstart/02_judge.yaml --set pairing.min_length_gap=5 --force
    python 02_judge/judge.py --config configs/gpu/02_judge.yaml --dry-run   # plan only, no GPU needed

Reads `<output_dir>/01_generate/`, drops the candidates `filters` reject (empty, too short or long, invalid
characters, duplicates), scores the rest with the judge named by `judge.type` (similarity: MiniLM on CPU; quiz,
rubric: a judge LLM through vLLM on Ray Data) and pairs them with the `pairing` rule. Writes `<output_dir>/02_judge/`:
the pairs under data/ (prompt, chosen, rejected as chat messages, plus both scores and lengths), candidates.parquet
(every candidate, its score and why it was filtered), scores.png, length_gap.png and manifest.json; with
`pairing.valid_fraction`, the pairs of that share of prompts go to valid_pairs.parquet instead (stage 3's validation).
"""
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import schema as S  # noqa: E402
from common.data import num_blocks  # noqa: E402
from common.errors import UserError, cli  # noqa: E402
from common.filters import filter_reasons, filter_warnings  # noqa: E402
from common.io import StageOutput, read_manifest  # noqa: E402
from common.judges import build_judge, error_counts, num_words, parse_details, score_range  # noqa: E402
from common.pairing import check_threshold, make_pairs, pairable, split_valid, summarize  # noqa: E402
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

    # Filters first, on the driver (duplicates need all of a prompt's candidates at once): the judge never spends
    # time on a candidate that could not be paired anyway, and "nothing to pair" fails before any model starts.
    table = pq.read_table(Path(upstream["dir"]) / "data").sort_by([(S.PROMPT_ID, "ascending"),
                                                                   (S.CANDIDATE, "ascending")])
    n = table.num_rows
    reasons = filter_reasons(table.select([S.PROMPT_ID, S.RESPONSE]).to_pandas(), cfg.filters)
    filtered = dict(Counter(r for r in reasons if r))
    for warning in filter_warnings(filtered, n):  # a filter made for the quickstart can eat another task's answers
        print(f"[{STAGE}] {warning}", flush=True)
    kept = table.filter(pa.array([not r for r in reasons]))
    if not pairable(kept.column(S.PROMPT_ID).to_pylist(), kept.column(S.RESPONSE).to_pylist()):
        raise UserError(f"{args.config}: 0 pairs possible: the filters removed {sum(filtered.values())} of {n} "
                        f"candidates {filtered} and no prompt has two different candidates left, so there is "
                        f"nothing for stage 3 to train on; loosen `filters` or sample more candidates (sampling.n)")

    init_ray(cfg.ray)
    import ray

    t0 = time.time()
    # Block count set here, not by repartition(): an all-to-all repartition wants a whole free CPU and can hang on
    # 2 cores. Contiguous slices keep a prompt's candidates together (its source is embedded once per batch).
    blocks = num_blocks(kept.num_rows, max(a.count for a in asks))
    size = -(-kept.num_rows // blocks)
    candidates = ray.data.from_arrow([kept.slice(i, size) for i in range(0, kept.num_rows, size)])
    scored = judge.score(candidates).to_pandas()  # one row per candidate: small enough for the driver
    scored = scored.sort_values([S.PROMPT_ID, S.CANDIDATE], ignore_index=True)
    seconds = time.time() - t0

    details = parse_details(scored[S.JUDGE_DETAIL])
    unparseable = int(scored[S.SCORE].isna().sum())
    pairs, pair_stats = make_pairs(scored, cfg.pairing, cfg.seed)
    if not pairs:
        raise UserError(f"{args.config}: 0 pairs from {n} candidates ({sum(filtered.values())} filtered "
                        f"{filtered or ''}, {unparseable} unparseable, {pair_stats['ties_dropped']} ties): nothing for "
                        f"stage 3 to train on; lower pairing.min_length_gap or pairing.quality_margin, loosen "
                        f"filters, or sample more candidates per prompt in stage 1 (sampling.n)")

    # Held out by prompt: stage 3 evaluates on them (eval/loss), and never trains on them.
    train, valid = split_valid(pairs, cfg.pairing.valid_fraction, cfg.seed)
    out.begin()
    ray.data.from_items(train, override_num_blocks=1).write_parquet(str(out.data))
    if valid:
        pq.write_table(pa.Table.from_pylist(valid), out.path("valid_pairs.parquet"))
    removed = table.filter(pa.array([bool(r) for r in reasons])).drop_columns([S.PROMPT]).to_pandas()
    removed[S.FILTER_REASON] = [r for r in reasons if r]
    removed[S.NUM_WORDS] = [num_words(t) for t in removed[S.RESPONSE]]
    scored[S.FILTER_REASON] = ""
    everyone = pd.concat([scored.drop(columns=[S.PROMPT]), removed], ignore_index=True)
    everyone.sort_values([S.PROMPT_ID, S.CANDIDATE]).to_parquet(out.path("candidates.parquet"), index=False)
    score_histogram(scored[S.SCORE], out.path("scores.png"), f"{cfg.judge.type} judge: {len(scored)} candidates",
                    threshold=cfg.pairing.quality_threshold)
    length_gap_histogram([p[S.CHOSEN_WORDS] for p in pairs], [p[S.REJECTED_WORDS] for p in pairs],
                         out.path("length_gap.png"), f"{len(pairs)} pairs: chosen minus rejected length")
    stats = {
        "judge": cfg.judge.type, "candidates": n, "filtered": sum(filtered.values()), "filtered_by_reason": filtered,
        "candidates_scored": len(scored) - unparseable, "unparseable": unparseable,
        "unparseable_by_reason": error_counts(details), "score": summarize(scored[S.SCORE]),
        **pair_stats, "valid_pairs": len(valid), "valid_prompts": len({p[S.PROMPT_ID] for p in valid}),
        "judge_details": judge.summary(details), "judge_seconds": round(seconds, 1),
    }
    manifest = out.commit(rows={"pairs": len(train), "valid_pairs": len(valid), "candidates": n}, stats=stats,
                          valid_pairs=str(out.final / "valid_pairs.parquet") if valid else None)
    held = f"{len(valid)} pairs of {stats['valid_prompts']} prompts held out for validation. " if valid else ""
    print(f"[{STAGE}] {n} candidates: {sum(filtered.values())} filtered {filtered or ''}, {len(scored)} judged by "
          f"{cfg.judge.type} in {seconds:.0f}s ({unparseable} unparseable, mean score "
          f"{stats['score'].get('mean', float('nan')):.3f}). {len(pairs)} pairs from {pair_stats['prompts_with_pairs']} "
          f"of {pair_stats['prompts']} prompts ({pair_stats['pairs_by_rule']['quality']} on quality, "
          f"{pair_stats['pairs_by_rule']['length']} on length; {pair_stats['ties_dropped']} ties dropped; at most "
          f"{pair_stats['pairs_per_prompt_max']} per prompt); chosen minus rejected, on average: "
          f"{pair_stats['chosen_minus_rejected_words_mean']:+.1f} words, "
          f"{pair_stats['chosen_minus_rejected_score_mean']:+.3f} score. {held}"
          f"Output: {manifest['dir']}", flush=True)


if __name__ == "__main__":
    main()
