"""Stage 2: score stage 1's candidates with a judge and pair them into a preference dataset (TRL format).

    python 02_judge/judge.py --config configs/quickstart/02_judge.yaml
    python 02_judge/judge.py --config configs/quickstart/02_judge.yaml --set pairing.min_length_gap=5 --force
    python 02_judge/judge.py --config configs/gpu/02_judge.yaml --dry-run   # plan only, no GPU needed

Reads `<output_dir>/01_generate/` and streams it through one Ray Data pipeline (per-prompt steps grouped by prompt:
common/per_prompt.py): drops the candidates `filters` reject (empty, too short or long, invalid
characters, duplicates), scores the rest with the judge named by `judge.type` (similarity: MiniLM on CPU; quiz,
rubric: a judge LLM through vLLM on Ray Data) and pairs them with the `pairing` rule. Writes `<output_dir>/02_judge/`:
the pairs under data/ (prompt, chosen, rejected as chat messages, plus both scores and lengths), candidates.parquet/
(every candidate, its score and why it was filtered), scores.png, length_gap.png and manifest.json; with
`pairing.valid_fraction`, the pairs of that share of prompts go to valid_pairs.parquet/ instead (stage 3's
validation). The .parquet outputs are folders of parquet files; pandas and pyarrow read each as one table.
"""
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import schema as S  # noqa: E402
from common.data import num_blocks  # noqa: E402
from common.errors import UserError, cli  # noqa: E402
from common.filters import filter_warnings  # noqa: E402
from common.io import StageOutput, read_manifest  # noqa: E402
from common.judges import build_judge, error_counts, score_range  # noqa: E402
from common.pairing import check_threshold, holdout_count, summarize  # noqa: E402
from common.per_prompt import (all_candidates, column, details, explode, filter_totals, holdout_cutoff,  # noqa: E402
                               mark_filters, pair_prompts, pair_totals, prompt_rows, stage1_prompts, to_judge,
                               with_prompts)
from common.plots import length_gap_histogram, score_histogram  # noqa: E402
from common.ray_setup import Ask, check_fits, init_ray, print_plan  # noqa: E402
from common.stage import parse  # noqa: E402

STAGE = "02_judge"


@cli
def main() -> None:
    args, cfg = parse(STAGE, __doc__)
    judge = build_judge(cfg.judge)
    asks = judge.asks() + [Ask("read / filter / pair task", 1, {"CPU": 0.25})]
    print_plan(STAGE, asks, cfg.ray)
    check_threshold(cfg.judge, cfg.pairing, *score_range(cfg.judge), args.config)
    if args.dry_run:
        return
    check_fits(STAGE, asks, cfg.ray)
    upstream = read_manifest(cfg.input_dir, "01_generate")
    prompts_file = stage1_prompts(upstream)
    out = StageOutput(cfg, STAGE, upstream=upstream, force=args.force)
    if out.reusable():
        return

    init_ray(cfg.ray)
    import ray

    # One Ray Data pipeline from stage 1's files to ours: the driver holds counts and one number per candidate,
    # never a row. Block count set at read time, not by repartition() (an all-to-all that can hang on 2 cores).
    blocks = num_blocks(int(upstream["rows"]["candidates"]), max(a.count for a in asks))
    candidates = ray.data.read_parquet(str(Path(upstream["dir"]) / "data"), override_num_blocks=blocks)
    prompts = (ray.data.read_parquet(str(prompts_file), override_num_blocks=blocks)
               if prompts_file else None)  # None: a stage-1 output from before prompts.parquet (sources inline)

    # Filters first (duplicates are per prompt: a groupby), so the judge never spends time on a candidate that could
    # not be paired anyway, and "nothing to pair" fails before any model starts. The prompts' rows join the same
    # groupby, which hands the kept candidates their source (common.per_prompt).
    marked = mark_filters(with_prompts(candidates, prompts), cfg.filters, blocks,
                          keep_prompts=prompts is None).materialize()  # pairing reads prompts again, if it can
    filtered, can_pair, n = filter_totals(marked)
    for warning in filter_warnings(filtered, n):  # a filter made for the quickstart can eat another task's answers
        print(f"[{STAGE}] {warning}", flush=True)
    if not can_pair:
        raise UserError(f"{args.config}: 0 pairs possible: the filters removed {sum(filtered.values())} of {n} "
                        f"candidates {filtered} and no prompt has two different candidates left, so there is "
                        f"nothing for stage 3 to train on; loosen `filters` or sample more candidates (sampling.n)")

    t0 = time.time()
    # The judge's actors are gone before the pairing groupby starts; the sources stay behind (the pairing groupby
    # gets them from the prompt rows).
    scored = judge.score(to_judge(marked)).drop_columns([S.SOURCE]).materialize()
    seconds = time.time() - t0
    scores = column(scored, S.SCORE)
    unparseable = int(np.isnan(scores).sum())

    per_prompt = pair_prompts(scored, prompt_rows(marked, prompts), cfg.pairing, cfg.seed, blocks).materialize()
    pair_stats = pair_totals(per_prompt)
    if not pair_stats["pairs"]:
        raise UserError(f"{args.config}: 0 pairs from {n} candidates ({sum(filtered.values())} filtered "
                        f"{filtered or ''}, {unparseable} unparseable, {pair_stats['ties_dropped']} ties): nothing for "
                        f"stage 3 to train on; lower pairing.min_length_gap or pairing.quality_margin, loosen "
                        f"filters, or sample more candidates per prompt in stage 1 (sampling.n)")

    # Held out by prompt: stage 3 evaluates on them (eval/loss), and never trains on them.
    cutoff = holdout_cutoff(per_prompt, cfg.pairing.valid_fraction)
    held_prompts = holdout_count(pair_stats["prompts_with_pairs"], cfg.pairing.valid_fraction)
    out.begin()
    explode(per_prompt, cutoff, held=False).write_parquet(str(out.data))
    valid = explode(per_prompt, cutoff, held=True).materialize() if cutoff >= 0 else None
    num_valid = valid.count() if valid is not None else 0
    if num_valid:
        valid.write_parquet(str(out.path("valid_pairs.parquet")))  # a folder of parquet files, read as one table
    all_candidates(marked, scored).write_parquet(str(out.path("candidates.parquet")))
    score_histogram(scores, out.path("scores.png"), f"{cfg.judge.type} judge: {len(scores)} candidates",
                    threshold=cfg.pairing.quality_threshold)
    words = [pq.read_table(f, columns=[S.CHOSEN_WORDS, S.REJECTED_WORDS])  # two int columns, as numpy
             for f in ([out.data, out.path("valid_pairs.parquet")] if num_valid else [out.data])]
    length_gap_histogram(np.concatenate([w.column(S.CHOSEN_WORDS).to_numpy() for w in words]),
                         np.concatenate([w.column(S.REJECTED_WORDS).to_numpy() for w in words]),
                         out.path("length_gap.png"), f"{pair_stats['pairs']} pairs: chosen minus rejected length")
    num_train = pair_stats["pairs"] - num_valid
    stats = {
        "judge": cfg.judge.type, "candidates": n, "filtered": sum(filtered.values()), "filtered_by_reason": filtered,
        "candidates_scored": len(scores) - unparseable, "unparseable": unparseable,
        "unparseable_by_reason": error_counts(details(scored)), "score": summarize(scores),
        **pair_stats, "valid_pairs": num_valid, "valid_prompts": held_prompts if num_valid else 0,
        "judge_details": judge.summary(details(scored)), "judge_seconds": round(seconds, 1),
    }
    manifest = out.commit(rows={"pairs": num_train, "valid_pairs": num_valid, "candidates": n}, stats=stats,
                          valid_pairs=str(out.final / "valid_pairs.parquet") if num_valid else None)
    held = f"{num_valid} pairs of {stats['valid_prompts']} prompts held out for validation. " if num_valid else ""
    print(f"[{STAGE}] {n} candidates: {sum(filtered.values())} filtered {filtered or ''}, {len(scores)} judged by "
          f"{cfg.judge.type} in {seconds:.0f}s ({unparseable} unparseable, mean score "
          f"{stats['score'].get('mean', float('nan')):.3f}). {pair_stats['pairs']} pairs from "
          f"{pair_stats['prompts_with_pairs']} of {pair_stats['prompts']} prompts "
          f"({pair_stats['pairs_by_rule']['quality']} on quality, {pair_stats['pairs_by_rule']['length']} on length; "
          f"{pair_stats['ties_dropped']} ties dropped; at most {pair_stats['pairs_per_prompt_max']} per prompt); "
          f"chosen minus rejected, on average: {pair_stats['chosen_minus_rejected_words_mean']:+.1f} words, "
          f"{pair_stats['chosen_minus_rejected_score_mean']:+.3f} score. {held}Output: {manifest['dir']}", flush=True)


if __name__ == "__main__":
    main()
