"""Stage 3 on a Ray cluster of four nodes, submitted with `ray job submit` exactly as the README says.

The nodes are `ray start` processes on this machine (each raylet is a node): a head without accelerators, two
nodes declaring `accelerator_type:A10G` (the reference pool asks for it), one declaring `accelerator_type:A100`
(the trainers ask for it). Storage every node sees is the local disk here, so the model and output_dir are absolute
paths, as they would be on /mnt/cluster_storage. Everything runs for real; nothing is mocked.

Other Ray instances may run on this machine: the cluster has its own temp dir (RAY_TMPDIR, so no `ray.init()`
elsewhere finds it), its own ports, and is torn down by killing only the processes it started (never `ray stop`).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from common.io import read_manifest
from conftest import REPO, training_progress
from test_dpo_stage import write_pairs

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent  # the venv's bin/: `ray`, and the `python` the job's entrypoint runs
CONFIG = "configs/quickstart/03_dpo_train.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """`ray start --block` processes, one per node, each in a session of its own so its raylet, agents and workers
    go with it."""

    def __init__(self):
        # Short: Ray's unix socket paths live under it.
        self.root = tempfile.mkdtemp(prefix="rmn", dir="/tmp")
        self.env = {**os.environ, "RAY_TMPDIR": self.root, "RAY_AUTH_MODE": "disabled",
                    "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    # a loaded machine starts a dashboard agent slower than the raylet waits for it by default
                    "RAY_agent_register_timeout_ms": "300000",
                    # Ray's OOM killer reads the whole machine's memory, other users' processes included
                    "RAY_memory_monitor_refresh_ms": "0",
                    # Ray 2.60 deletes a job's unpacked working dir from the head once the workers that used it
                    # there exit, while the job's driver still runs inside it. Ray's documented switch keeps it.
                    "RAY_runtime_env_skip_local_gc": "1",
                    # Ray Train's wait for a worker group's resources, per attempt (60 s by default): shorter, so
                    # the node-loss test sees several attempts fail while no A100 node is alive
                    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: dict[str, subprocess.Popen] = {}
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, num_cpus: float, resources: dict, head: bool = False) -> None:
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
               "--num-gpus", "0", "--resources", json.dumps(resources), "--object-store-memory", str(200 << 20),
               "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats"]
        for flag in ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc",
                     "metrics-export", "runtime-env-agent"):
            cmd += [f"--{flag}-port", str(free_port())]
        if head:
            cmd += ["--head", "--port", str(self.gcs_port), "--temp-dir", self.root, "--include-dashboard", "true",
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                    "--ray-client-server-port", str(free_port())]
        else:
            # A temp dir of its own, as a machine of its own has: on a shared one, a node's runtime-env agent
            # re-unpacks the job's working dir (rmtree, then unzip) into the path the driver is importing from.
            (Path(self.root) / name).mkdir(exist_ok=True)
            cmd += ["--address", f"127.0.0.1:{self.gcs_port}", "--temp-dir", str(Path(self.root) / name)]
        log = open(Path(self.root) / f"{name}.log", "w")
        self.nodes[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def up(self, workers: dict[str, dict], timeout: float = 900) -> dict[str, dict]:
        """Head first, then `workers` ({name: resources}); returns {node_id: resources} once all are alive."""
        # The head runs no tasks (num-cpus 0), as on a real cluster: the job's driver runs there.
        self.specs = {"head": (0, {}, True), **{name: (1, res, False) for name, res in workers.items()}}
        nodes: dict[str, dict] = {}
        self.node_ids: dict[str, str] = {}  # our name -> Ray node id
        for n, name in enumerate(self.specs, 1):  # one at a time: on a loaded machine each registers sooner
            self._start(name, *self.specs[name])
            before, nodes = nodes, self.wait_nodes(n, timeout)
            (self.node_ids[name],) = set(nodes) - set(before)
        return nodes

    def alive_nodes(self) -> dict[str, dict]:
        """{node_id: resources} of the alive nodes, from `ray list nodes` (the state API, through the dashboard)."""
        out = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", self.dashboard, "--format", "json",
                              "--filter", "state=ALIVE", "--detail"], env=self.env, capture_output=True, text=True,
                             timeout=120)
        try:  # the dashboard answers a while after the head is up
            return {n["node_id"]: n["resources_total"] for n in json.loads(out.stdout)}
        except (ValueError, TypeError, KeyError):
            return {}

    def wait_nodes(self, n: int, timeout: float) -> dict[str, dict]:
        deadline, restarts = time.time() + timeout, {name: 0 for name in self.nodes}
        while time.time() < deadline:
            for name, p in list(self.nodes.items()):
                if p.poll() is not None:
                    # `ray start` gives a raylet 30 s (hard-coded) to register; a loaded machine can take longer.
                    assert "timed out during startup" in self.log(name) and restarts.get(name, 0) < 4, \
                        f"node {name} exited: {self.log(name)[-3000:]}"
                    restarts[name] = restarts.get(name, 0) + 1
                    self._killpg(p, signal.SIGKILL)  # what it did start
                    self._start(name, *self.specs[name])
            nodes = self.alive_nodes()
            if len(nodes) >= n:
                return nodes
            time.sleep(2)
        raise AssertionError(f"{n} nodes not alive after {timeout}s: {self.log('head')[-3000:]}")

    def log(self, name: str) -> str:
        return (Path(self.root) / f"{name}.log").read_text(errors="replace")

    @staticmethod
    def _killpg(p: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass

    def kill_node(self, name: str) -> None:
        """Node loss: its raylet, agents and workers SIGKILLed at once, as when a machine disappears."""
        node = self.nodes.pop(name)
        self._killpg(node, signal.SIGKILL)
        node.wait()

    def wait_gone(self, node_id: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while node_id in self.alive_nodes():
            assert time.time() < deadline, f"node {node_id} still alive {timeout}s after its raylet was killed"
            time.sleep(1)

    def revive(self, name: str, timeout: float = 900) -> str:
        """Capacity returns: a new node of the same kind joins (a new Ray node id, as a replacement machine has)."""
        before = self.alive_nodes()
        self._start(name, *self.specs[name])
        (self.node_ids[name],) = set(self.wait_nodes(len(before) + 1, timeout)) - set(before)
        return self.node_ids[name]

    def down(self) -> None:
        for p in self.nodes.values():
            self._killpg(p, signal.SIGTERM)
        for p in self.nodes.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for pid in self._own_pids():  # what outlived its node: workers, the job's driver (a session of its own)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not os.environ.get("MULTINODE_KEEP_LOGS"):
            shutil.rmtree(self.root, ignore_errors=True)

    def _own_pids(self) -> list[int]:
        """Processes started by this cluster: they, and only they, carry its RAY_TMPDIR."""
        mark = f"RAY_TMPDIR={self.root}".encode()
        pids = []
        for d in Path("/proc").glob("[0-9]*"):
            try:
                if mark in (d / "environ").read_bytes().split(b"\0") and int(d.name) != os.getpid():
                    pids.append(int(d.name))
            except OSError:
                continue
        return pids


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        t0 = time.time()
        c.node_resources = c.up({"a10g-1": {"accelerator_type:A10G": 1}, "a10g-2": {"accelerator_type:A10G": 1},
                                 "a100": {"accelerator_type:A100": 1}})
        print(f"cluster of {len(c.node_resources)} nodes up in {time.time() - t0:.0f}s", flush=True)
        yield c
    finally:
        c.down()


def submit(cluster: Cluster, out: Path, pairs: Path, *sets: str, wait: bool = True):
    """The README's command, from the repo root. The model and output_dir are absolute: the job's working dir is a
    copy of the code only (.rayignore), and relative paths would resolve inside that copy."""
    model = (REPO / "models" / "smollm2-135m-instruct").resolve()
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--",
           "python", "03_dpo_train/train.py", "--config", CONFIG,
           "--set", "ray.address=auto", "--set", f"model_id={model}", "--set", f"train_path={pairs}",
           "--set", f"output_dir={out}",
           "--set", 'worker_resources={"accelerator_type:A100": 1}',
           "--set", 'preference_tuning_config.logprob_processor_scaling_config.custom_resources='
                    '{"accelerator_type:A10G": 1}',
           "--set", "preference_tuning_config.logprob_processor_scaling_config.concurrency=2",
           "--set", "preference_tuning_config.logprob_processor_scaling_config.batch_size=2",
           "--set", "num_cpus_per_worker=0.5", "--set", "cpu_threads_after_reference=1",
           "--set", "train_batch_size_per_device=2", "--set", "num_data_blocks_per_device=4", "--set", "num_epochs=1"]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in cluster.env.items() if k != "RAY_TMPDIR"}  # a client machine knows only the URL
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


def uploaded_packages(cluster: Cluster) -> list[Path]:
    """The unpacked working dirs of the jobs, on the head."""
    return [p for p in Path(cluster.root).glob("session_*/runtime_resources/working_dir_files/*") if p.is_dir()]


def by_kind(nodes: dict[str, dict], kind: str) -> set[str]:
    return {nid for nid, res in nodes.items() if f"accelerator_type:{kind}" in res}


def test_stage3_job_places_reference_on_a10g_and_trainers_on_a100(cluster, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    out = tmp_path / "out"
    t0 = time.time()
    proc = submit(cluster, out, pairs)
    took = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout.lower(), proc.stdout[-3000:]
    print(f"stage 3 as a Ray job: {took:.0f}s", flush=True)

    # Outputs on the shared storage, none in the job's working dir.
    m = read_manifest(out / "03_dpo_train", "03_dpo_train")  # its paths resolved (written relative to out)
    assert (out / "03_dpo_train" / "model" / "config.json").exists()
    assert m["stats"]["pairs_trained"] == 8
    rows = [json.loads(line) for line in open(out / "03_dpo_train" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]

    # Placement, by Ray node id: the reference pool on both A10G nodes, every trainer on the A100 node.
    a10g, a100 = by_kind(cluster.node_resources, "A10G"), by_kind(cluster.node_resources, "A100")
    assert len(a10g) == 2 and len(a100) == 1
    refs = m["stats"]["reference_actors"]
    assert refs and {r["node_id"] for r in refs} == a10g, (refs, cluster.node_resources)
    assert all(r["resources"].get("accelerator_type:A10G") == 1 for r in refs)
    trainers = m["stats"]["trainers"]
    assert len(trainers) == 1 and set(m["stats"]["trainer_node_ids"]) == a100, (trainers, cluster.node_resources)
    assert trainers[0]["resources"].get("accelerator_type:A100") == 1

    # The working dir shipped code only: .rayignore kept models/, data/, outputs/, .venv/ out.
    pkgs = uploaded_packages(cluster)
    assert pkgs, "no unpacked working dir found on the head"
    for pkg in pkgs:
        top = {p.name for p in pkg.iterdir()}
        assert {"common", "03_dpo_train", "configs"} <= top, top
        assert not top & {"models", "data", "outputs", ".venv", ".git"}, top
        total = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
        assert total < 5 << 20, f"{pkg}: {total} bytes"
        assert not any(pkg.rglob("*.safetensors"))
        assert not list(pkg.rglob("manifest.json")), "an output landed in the job's working dir"
    print(f"uploaded working dir: {total / 2**20:.1f} MiB", flush=True)


def test_losing_an_a10g_node_mid_pool_the_epoch_finishes_on_the_other(cluster, tmp_path):
    """Node loss: one A10G node's raylet, agents and reference actor SIGKILLed while the pool runs. The actor is
    restarted on the other A10G node (half an A10G each, so both nodes hold two), its lost blocks recomputed, and
    the epoch ends with every pair trained exactly once. The kill lands once the first actor has loaded its model,
    early in the pool."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", 16)
    out = tmp_path / "out"
    ref = "preference_tuning_config.logprob_processor_scaling_config"
    job = submit(cluster, out, pairs, f'{ref}.custom_resources={{"accelerator_type:A10G": 0.5}}',
                 f"{ref}.batch_size=1", "num_data_blocks_per_device=16", wait=False)
    actors = out / ".03_dpo_train.work" / "reference_actors"
    a10g_names = ("a10g-1", "a10g-2")
    killed = None
    try:
        deadline = time.time() + 1200
        while job.poll() is None and time.time() < deadline and killed is None:
            seen = [json.loads(f.read_text()) for f in actors.glob("*.json")] if actors.exists() else []
            if seen:  # an actor has loaded its model: the pool is running. Lose the node it runs on.
                victim = seen[0]["node_id"]
                killed = next(n for n in a10g_names if cluster.node_ids[n] == victim)
                cluster.kill_node(killed)
            time.sleep(0.5)
        assert killed, "the job ended before any reference actor started"
        log, _ = job.communicate(timeout=1800)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, log[-5000:]
    m = read_manifest(out / "03_dpo_train", "03_dpo_train")  # its paths resolved (written relative to out)
    survivor = cluster.node_ids[next(n for n in a10g_names if n != killed)]
    refs = m["stats"]["reference_actors"]
    assert survivor in {r["node_id"] for r in refs}, refs  # the pool went on on the other A10G node
    # Every pair reached the trainer exactly once: steps of 2 pairs, and the reference cache (written only when the
    # trained pairs' log-probs cover every pair once) holds all 16 ids.
    rows = [json.loads(line) for line in open(out / "03_dpo_train" / "metrics.jsonl")]
    assert max(r["step"] for r in rows) == 8 and m["stats"]["pairs_trained"] == 16
    cache = pd.read_parquet(m["reference_cache"])
    assert len(cache) == 16 and cache["pair_id"].is_unique


def test_losing_the_a100_node_the_run_waits_and_resumes_from_its_checkpoint_when_capacity_returns(cluster, tmp_path):
    """The trainers' node lost after step 3 (a checkpoint every 2 steps): with no A100 left, Ray Train keeps
    rescheduling the worker group (worker-group start timeouts do not count against max_failures) and the job
    waits. A new A100 node joins; the run resumes there from the step-2 checkpoint and trains every other pair
    of the epoch exactly once."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", 16)
    out = tmp_path / "out"
    ref = "preference_tuning_config.logprob_processor_scaling_config"
    # Half an A10G per actor: the pool fits on one A10G node, in case the test before this one lost the other.
    job = submit(cluster, out, pairs, f'{ref}.custom_resources={{"accelerator_type:A10G": 0.5}}',
                 "checkpoint_every_n_steps=2", "max_failures=1", wait=False)
    lost = cluster.node_ids["a100"]
    try:
        deadline = time.time() + 1200
        while job.poll() is None and time.time() < deadline:
            last, checkpointed = training_progress(out / ".03_dpo_train.work")
            if last["step"] >= 3 and checkpointed == 2:  # the step-2 checkpoint is one the restart finds
                break
            time.sleep(0.3)
        assert job.poll() is None, "the job ended before step 3"
        cluster.kill_node("a100")
        cluster.wait_gone(lost)
        time.sleep(40)  # over two worker-group start attempts (15 s each, set in Cluster.env)
        assert job.poll() is None, "the job gave up while no A100 node was alive"
        assert lost not in cluster.alive_nodes()
        new = cluster.revive("a100")
        log, _ = job.communicate(timeout=1800)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, log[-5000:]
    manifest = read_manifest(out / "03_dpo_train", "03_dpo_train")  # its paths resolved (written relative to out)
    m = manifest["stats"]
    assert set(m["trainer_node_ids"]) == {lost, new}, m["trainers"]  # both attempts ran on an A100 node
    rows = [json.loads(line) for line in open(out / "03_dpo_train" / "metrics.jsonl")]
    resumed = next(i for i, r in enumerate(rows) if "resumed_from_step" in r)
    assert rows[resumed]["resumed_from_step"] == 2  # from the checkpoint, not from scratch
    kept = [r for r in rows[:resumed] if r["step"] <= 2] + rows[resumed:]
    assert [r["step"] for r in kept] == list(range(1, 9)) and sum(r["pairs"] for r in kept) == 16, kept
    cache = pd.read_parquet(manifest["reference_cache"])
    assert len(cache) == 16 and cache["pair_id"].is_unique
