"""The closing summary of a run: per stage, its time, what it produced and where; then stage 4's bar.

    python -m common.summary outputs/quickstart
    python -m common.summary --config configs/quickstart/04_evaluate.yaml --set output_dir=outputs/mine

Reads each stage's manifest.json (common.io), prints one markdown table and writes it to `<output_dir>/summary.md`.
`--since <unix time>` marks the stages whose output is older (reused, not rerun: their time is the earlier run's).
"""
from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path

from common.config import REPO, resolve
from common.errors import cli
from common.io import STAGE_SCRIPTS


def _produced(stage: str, m: dict) -> str:
    rows, stats = m.get("rows", {}), m.get("stats", {})
    if stage == "01_generate":
        used = stats.get("prompts", 0) - stats.get("prompts_skipped", 0)
        return f"{rows.get('candidates')} candidates from {used} prompts"
    if stage == "02_judge":
        return f"{rows.get('pairs')} pairs from {rows.get('candidates')} candidates"
    if stage == "03_dpo_train":
        return f"{stats.get('steps')} steps on {rows.get('pairs_trained')} pairs"
    if stage == "04_evaluate":
        return f"{rows.get('responses')} judged responses on {stats.get('prompts')} prompts"
    return ", ".join(f"{v} {k}" for k, v in rows.items())


def _where(stage: str, m: dict, folder: Path) -> str:
    target = {"03_dpo_train": m.get("model"), "04_evaluate": m.get("report")}.get(stage) or folder
    p = Path(target)
    if not p.is_absolute():  # manifests record paths relative to output_dir (common.io)
        p = folder.parent / p
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m {s:02d}s" if m else f"{s}s"


def _created(m: dict) -> float:
    try:
        return datetime.strptime(m["created"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (KeyError, ValueError):
        return 0.0


def summarize(output_dir: Path, since: float | None = None) -> str:
    """The table and stage 4's bar, as markdown."""
    lines = ["| stage | time | produced | where |", "|---|---|---|---|"]
    total, last = 0.0, None
    for stage in STAGE_SCRIPTS:
        folder = output_dir / stage
        try:
            m = json.loads((folder / "manifest.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            lines.append(f"| {stage} | - | not run (no complete output) | - |")
            continue
        reused = since is not None and _created(m) < since
        total += 0.0 if reused else m.get("seconds", 0.0)
        when = f"reused ({m.get('created', '?')[:16]})" if reused else _duration(m.get("seconds", 0.0))
        lines.append(f"| {stage} | {when} | {_produced(stage, m)} | {_where(stage, m, folder)} |")
        last = m if stage == "04_evaluate" else last
    lines.append(f"| total | {_duration(total)} | | |")
    if last is not None and last.get("targets"):
        # as a list, so no line repeats stage 4's own PASS/FAIL lines word for word
        bar = [f"- {'PASS' if t['pass'] else 'FAIL'}: {t['check']}" for t in last["targets"]]
        lines += ["", "Stage 4's bar:", *bar]
    return "\n".join(lines) + "\n"


def _output_dir(args: argparse.Namespace) -> Path:
    if args.output_dir:
        return resolve(args.output_dir)
    from common.config import load_config

    return resolve(load_config("04_evaluate", args.config, args.set).output_dir)


@cli
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("output_dir", nargs="?", help="the run's output_dir (or give --config and --set)")
    p.add_argument("--config", default="configs/quickstart/04_evaluate.yaml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--since", type=float, default=None, help="unix time the run started (marks reused stages)")
    args, _ = p.parse_known_args(argv)  # a stage's own flags (--force, --verbose) may come along: ignored
    out = _output_dir(args)
    text = summarize(out, args.since)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(f"# Run summary: {out}\n\n{text}")
    print(f"\n{text}\nSummary: {out / 'summary.md'}", flush=True)


if __name__ == "__main__":
    main()
