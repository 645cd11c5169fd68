"""What every stage script's command line has in common: `--config`, `--set`, `--force`, `--dry-run`, `--verbose`."""
from __future__ import annotations

import argparse

from common.config import load_config
from common.io import check_output_dir
from common.ray_setup import configure_output


def parse(stage: str, doc: str):
    """Parse the command line, load the stage's config and check its output_dir (UserError on anything wrong)."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    p.add_argument("--config", required=True, help=f"YAML config, e.g. configs/quickstart/{stage}.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, dotted (repeatable): --set sampling.n=8")
    p.add_argument("--force", action="store_true", help="redo even if a complete output of this config exists")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and print the resource plan; start nothing, write nothing")
    p.add_argument("--verbose", action="store_true",
                   help="also show the Ray workers' and libraries' own output (vLLM, Ray Train, Ray Data), which "
                        "otherwise stays in Ray's log files under /tmp/ray/session_latest/logs")
    args = p.parse_args()
    configure_output(args.verbose)
    cfg = load_config(stage, args.config, args.set)
    if not args.dry_run:  # before reading any input or starting anything: where the output goes must be usable
        check_output_dir(cfg.output_dir, stage)
    return args, cfg
