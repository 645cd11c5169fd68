"""Choose the quickstart's pairing knobs on ACLSum's validation split: stages 2-4 once per grid point, one table.

    .venv/bin/python benchmarks/sweep_recipe.py                                   # the threshold sweep of docs/stage2.md
    .venv/bin/python benchmarks/sweep_recipe.py --candidates outputs/quickstart/01_generate   # reuse stage 1's run
    .venv/bin/python benchmarks/sweep_recipe.py --point gap5 02_judge:pairing.min_length_gap=5   # your own points
    .venv/bin/python benchmarks/sweep_recipe.py --candidates outputs/quickstart/01_generate --result seeds.json \
        --point seed0 03_dpo_train:seed=0 --point seed1 03_dpo_train:seed=1 --point seed2 03_dpo_train:seed=2
    .venv/bin/python benchmarks/sweep_recipe.py --candidates outputs/quickstart/01_generate --result epochs.json \
        --point e1s0 03_dpo_train:num_epochs=1 --point e2s0 03_dpo_train:num_epochs=2   # the epochs of docs/stage2.md

Every point is the quickstart (configs/quickstart/) on the same stage-1 candidates of the 64 train abstracts, but
for its overrides; stage 4 then runs on the validation split (`--split`, ACLSum val: 50 abstracts). A point's win rate
is graded by its own stage-2 judge and rule (stage 4 takes them from stage 2's manifest), so win rates of points that
change the rule are not comparable with each other; the signals the model never trained on (ROUGE-L and MiniLM
similarity to the human summaries, copy share) are. The test split is refused: it is for the report, once.
Each point takes ~10 min on 2 cores (stage 3 most of it); outputs go under --out, the table to stdout and
benchmarks/results/sweep_recipe.json (`--result`). The last column is issue 17's bar: win rate >= 70% with the
interval's lower end above 50%, ROUGE-L not below SFT's, copy share not above SFT's. The seed points measure how much
of a run's result is its pairs' order and LoRA init alone: same pairs, same reference log-probs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common.config import load_config  # noqa: E402
from common.report import target_check  # noqa: E402

THRESHOLDS = ("0.62", "0.66", "0.68", "0.70", "0.74")
STAGES = ("02_judge/judge.py", "03_dpo_train/train.py", "04_evaluate/evaluate.py")


def run(script: str, output_dir: Path, sets: list[str]) -> None:
    stage = Path(script).parent.name
    cmd = [sys.executable, str(REPO / script), "--config", str(REPO / "configs/quickstart" / f"{stage}.yaml"),
           "--set", f"output_dir={output_dir}"]
    for s in sets:
        cmd += ["--set", s]
    print("[sweep] " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def run_point(point: Path, candidates: Path, overrides: list[str], split: str) -> None:
    """Stages 2-4 of one grid point on the shared stage-1 candidates; stage 4 on `split`."""
    point.mkdir(parents=True, exist_ok=True)
    if not (point / "01_generate").exists():
        (point / "01_generate").symlink_to(candidates)
    for script in STAGES:
        stage = Path(script).parent.name
        sets = [o.split(":", 1)[1] for o in overrides if o.split(":", 1)[0] == stage]
        if stage == "04_evaluate":
            sets.append(f"data.path={split}")
        run(script, point, sets)


def row(name: str, point: Path) -> dict:
    pairs = json.loads((point / "02_judge/manifest.json").read_text())["stats"]
    m = json.loads((point / "04_evaluate/metrics.json").read_text())
    dpo, sft, win = m["models"]["dpo"], m["models"]["sft"], m["win_rate"]["dpo"]
    return {
        "point": name, "quality_pairs": pairs["pairs_by_rule"]["quality"], "length_pairs": pairs["pairs_by_rule"]["length"],
        "chosen_minus_rejected_words": pairs["chosen_minus_rejected_words_mean"],
        "win_rate": win["win_rate"], "ci": [win["ci_low"], win["ci_high"]],
        "lc_win_rate": win["length_controlled"]["lc_win_rate"],
        **{f"{k}_{who}": model[k] for who, model in (("dpo", dpo), ("sft", sft))
           for k in ("mean_words", "copy_share", "rouge_l", "reference_similarity")},
        "judge_prefers_human_over_sft": sft["judge_vs_reference"]["preferred"],
        "bar": bar(m),
    }


def bar(metrics: dict) -> dict:
    """Issue 17's bar, as stage 4's report checks it: the win rate (with its interval), ROUGE-L, copy share."""
    target = load_config("04_evaluate", str(REPO / "configs/quickstart/04_evaluate.yaml"), []).target_win_rate
    checks = target_check(metrics, "dpo", target, max_score_drop=0.0)
    return {key: next(ok for text, ok in checks if text.startswith(prefix))
            for key, prefix in (("win_rate", "win rate"), ("rouge_l", "ROUGE-L"), ("copy_share", "copy share"))}


def table(rows: list[dict]) -> str:
    lines = ["| point | pairs: quality / length; chosen − rejected words | win rate [95% CI] (own judge) | LC win rate "
             "| words (SFT) | copy share (SFT) | ROUGE-L (SFT) | MiniLM sim. to human (SFT) | bar: win / ROUGE-L / copy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['point']} | {r['quality_pairs']} / {r['length_pairs']}; {r['chosen_minus_rejected_words']:+.1f} "
            f"| {r['win_rate']:.1%} [{r['ci'][0]:.1%}, {r['ci'][1]:.1%}] | {r['lc_win_rate']:.1%} "
            f"| {r['mean_words_dpo']:.1f} ({r['mean_words_sft']:.1f}) | {r['copy_share_dpo']:.1%} ({r['copy_share_sft']:.1%}) "
            f"| {r['rouge_l_dpo']:.3f} ({r['rouge_l_sft']:.3f}) "
            f"| {r['reference_similarity_dpo']:.3f} ({r['reference_similarity_sft']:.3f}) "
            f"| {' / '.join('met' if ok else 'missed' for ok in r['bar'].values())} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "outputs/sweep", help="one folder per point under here")
    p.add_argument("--split", default="data/aclsum/val.jsonl", help="stage 4's prompts (never the test split)")
    p.add_argument("--candidates", type=Path, help="reuse this stage-1 output folder instead of running stage 1")
    p.add_argument("--result", default="sweep_recipe.json", help="file name under benchmarks/results/")
    p.add_argument("--collect", action="store_true", help="run nothing: reprint the table of the points under --out")
    p.add_argument("--point", nargs="+", action="append", metavar=("NAME", "STAGE:KEY=VALUE"),
                   help="a grid point: a name and overrides, e.g. --point t0.6 02_judge:pairing.quality_threshold=0.6")
    args = p.parse_args()
    if "test" in Path(args.split).name:
        sys.exit(f"sweep_recipe.py: --split {args.split} looks like a test split: choose knobs on validation "
                 f"(data/aclsum/val.jsonl) and report on test once, with the quickstart")
    points = args.point or [[f"threshold {t}", f"02_judge:pairing.quality_threshold={t}"] for t in THRESHOLDS]
    out = args.out.resolve()
    candidates = args.candidates.resolve() if args.candidates else out / "01_generate"
    if not args.candidates and not args.collect:
        run("01_generate/generate.py", out, [])

    rows = []
    for name, *overrides in points:
        point = out / name.replace(" ", "_")
        if not args.collect:
            run_point(point, candidates, overrides, args.split)
        rows.append(row(name, point))
        print(table(rows), flush=True)

    result = REPO / "benchmarks/results" / args.result
    result.write_text(json.dumps({"split": args.split, "candidates": str(candidates), "rows": rows}, indent=1))
    print(f"\nsplit: {args.split}; stage-1 candidates: {candidates}; written to {result}\n\n{table(rows)}")


if __name__ == "__main__":
    main()
