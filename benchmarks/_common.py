"""Helpers shared by the benchmarks: environment, load average, process-tree memory sampling, result files.

Public tools only: time.perf_counter / time.time, /proc, resource.getrusage.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable

BENCH_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def bench_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for k, v in BENCH_ENV.items():
        env.setdefault(k, v)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def set_bench_env() -> None:
    for k, v in BENCH_ENV.items():
        os.environ.setdefault(k, v)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    flags = ""
    model = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) // 1024
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "avx512_bf16": "avx512_bf16" in flags,
            "mem_mib": mem, "python": platform.python_version()}


def versions() -> dict:
    out = {}
    for mod in ("torch", "transformers", "vllm", "ray", "trl", "peft"):
        try:
            r = subprocess.run([PY, "-c", f"import {mod}; print({mod}.__version__)"], capture_output=True,
                               text=True, timeout=120, env=bench_env())
            out[mod] = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "?"
        except Exception:  # noqa: BLE001
            out[mod] = "?"
    return out


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = _children(p)
        out.extend(kids)
        todo.extend(kids)
    return out


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process so far (from /proc/<pid>/stat), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class TreeMemorySampler(threading.Thread):
    """Polls every process under `root_pid` and keeps, per process, its command line, peak RSS (VmHWM, the
    kernel's own high-water mark, so a peak between two polls is not missed as long as one poll happens while the
    process is alive) and CPU seconds used (utime + stime; what a process uses after the last poll before it exits
    is missed). Only descendants of our own subprocess are read: other jobs on the machine are ignored."""

    def __init__(self, root_pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval = root_pid, interval
        self.procs: dict[int, dict] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for pid in [self.root, *descendants(self.root)]:
                hwm = _status_kib(pid, "VmHWM")
                if hwm is None:
                    continue
                rec = self.procs.setdefault(pid, {"cmd": "", "comm": "", "peak_kib": 0, "cpu_s": 0.0})
                cmd = _cmdline(pid)
                if cmd:
                    rec["cmd"] = cmd[:200]
                rec["comm"] = _comm(pid) or rec["comm"]
                rec["peak_kib"] = max(rec["peak_kib"], hwm)
                cpu = _cpu_seconds(pid)
                if cpu is not None:
                    rec["cpu_s"] = max(rec["cpu_s"], cpu)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds per kind of process (vLLM names its processes; Ray's show in their command lines)."""
        out: dict[str, float] = {}
        for pid, r in self.procs.items():
            cmd, comm = r["cmd"], r["comm"]
            if "EngineCore" in comm or "EngineCore" in cmd:
                k = "vllm EngineCore (scheduler)"
            elif "Worker" in comm and "ray::" not in cmd:
                k = "vllm Worker (model, OMP threads)"
            elif "vLLMEngineStageUDF" in cmd:
                k = "ray actor: vLLM frontend (AsyncLLM)"
            elif pid == self.root:
                k = "driver / benchmark process"
            elif "raylet" in cmd or "gcs_server" in cmd:
                k = "ray raylet + gcs"
            elif "ray::" in cmd:
                k = "other ray workers (Ray Data tasks, idle workers)"
            else:
                k = "other: " + (comm or cmd[:40])
            out[k] = round(out.get(k, 0.0) + r["cpu_s"], 1)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def peak_mib(self, contains: str) -> float | None:
        vals = [r["peak_kib"] for r in self.procs.values() if contains in r["cmd"]]
        return round(max(vals) / 1024, 1) if vals else None


def run_logged(cmd: list[str], log: Path, env: dict, timeout: int, sample_memory: bool = False):
    """Run `cmd`, stdout+stderr to `log`; returns (returncode, wall seconds, sampler or None)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        sampler = TreeMemorySampler(proc.pid) if sample_memory else None
        if sampler:
            sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            f.write(f"\n[bench] killed after {timeout}s\n")
        if sampler:
            sampler.stop()
    return rc, time.perf_counter() - t0, sampler


def result_marker_json(log: Path, marker: str = "BENCH_RESULT ") -> dict | None:
    """The last `BENCH_RESULT {json}` line a worker printed."""
    found = None
    for line in log.read_text(errors="replace").splitlines():
        i = line.find(marker)
        if i >= 0:
            try:
                found = json.loads(line[i + len(marker):])
            except json.JSONDecodeError:
                pass
    return found


def emit(result: dict) -> None:
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def save(result: dict, out: str | None, name: str) -> None:
    """To `out`, or to benchmarks/results/<name>-<today>.json."""
    import datetime

    path = Path(out) if out else REPO / "benchmarks/results" / f"{name}-{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"[bench] results written to {path}", flush=True)
