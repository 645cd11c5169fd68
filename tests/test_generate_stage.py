"""Stage 1 for real: Ray Data + ray.data.llm + vLLM (CPU build) with the embedded model, on a user's jsonl."""
import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, run_stage

pytestmark = pytest.mark.slow  # starts Ray / vLLM / stage subprocesses: not in `scripts/test.sh --fast`

CONFIG = REPO / "configs/quickstart/01_generate.yaml"
SCRIPT = "01_generate/generate.py"
TEXTS = {
    "t1": "The app crashes when I rotate my phone during checkout, and I lose my cart.",
    "t2": "Please add dark mode; the white background hurts at night.",
    "t3": "I was charged twice for one order and support has not answered in a week.",
    "long": "word " * 1500,  # longer than max_model_len - max_tokens: skipped and counted, not a crash
    "blank": "  \n ",  # no text, no prompt: dropped and counted
}


def write_prompts(path: Path, texts=TEXTS) -> Path:
    with open(path, "w") as f:
        for k, v in texts.items():
            f.write(json.dumps({"ticket": k, "body": v}) + "\n")
    return path


def sets_for(data: Path, out: Path, *extra: str) -> list[str]:
    # max_num_seqs=1: each sequence decoded on its own, so two runs agree token for token (vLLM's CPU kernels sum
    # in an order that depends on which sequences share a step; the README says how often the quickstart's differ)
    return ["engine.max_num_seqs=1", f"data.path={data}", "data.columns={id: ticket, text: body}", f"output_dir={out}",
            "prompt.template=Write a one-line title for this support ticket.\n\n{text}", "sampling.n=2",
            "sampling.max_tokens=24", "model.max_model_len=1024", *extra]


def rows(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "01_generate" / "data").sort_values(["prompt_id", "candidate_index"])


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    data = write_prompts(tmp / "tickets.jsonl")
    proc = run_stage(SCRIPT, CONFIG, *sets_for(data, tmp / "a"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, data, proc


def test_rows_ids_and_text(first):
    tmp, _, proc = first
    df = rows(tmp / "a")
    assert len(df) == 6 and sorted(set(df.prompt_id)) == ["t1", "t2", "t3"]
    assert sorted(df.candidate_index.unique()) == [0, 1]
    assert (df.response.str.strip().str.len() > 0).all()
    assert (df.num_response_tokens > 0).all() and (df.num_response_tokens <= 24).all()
    assert set(df.finish_reason) <= {"stop", "length"}
    assert (df.finish_reason == "length").eq(df.num_response_tokens == 24).all()
    # the prompt's own columns once per prompt, beside the candidates (not on each of them)
    assert not {"prompt", "source", "reference"} & set(df.columns)
    prompts = pd.read_parquet(tmp / "a" / "01_generate" / "prompts.parquet").sort_values("prompt_id")
    assert prompts.prompt_id.tolist() == ["t1", "t2", "t3"] and set(prompts.columns) == {
        "prompt_id", "prompt", "source", "reference"}
    first_prompt = list(prompts.prompt.iloc[0])
    assert first_prompt[-1]["role"] == "user" and "support ticket" in first_prompt[-1]["content"]
    assert all(src in list(p)[-1]["content"] for src, p in zip(prompts.source, prompts.prompt))
    assert "responses" in proc.stdout and "1 prompts skipped" in proc.stdout


def test_cpu_reserved_cores_reaches_the_engine_environment():
    """`engine.cpu_reserved_cores` becomes VLLM_CPU_NUM_OF_RESERVED_CPU in the vLLM actor's environment (0 in the
    quickstart: the model computes on both cores, 2x the decode speed on 2 cores); unset, vLLM keeps its default.
    The binding itself is vLLM's: it logs it from a subprocess that Ray does not reliably forward, so the stage's
    speed is what docs/benchmarks.md measures."""
    from common.config import load_config
    from common.generation import _cpu_env

    quick = load_config("01_generate", str(CONFIG), []).engine
    assert _cpu_env(quick) == {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    default = load_config("01_generate", str(CONFIG), ["engine.cpu_reserved_cores=null"]).engine
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in _cpu_env(default)


def test_over_long_prompt_is_skipped_and_counted(first):
    m = json.loads((first[0] / "a" / "01_generate" / "manifest.json").read_text())
    assert m["stats"]["prompts"] == 4 and m["stats"]["prompts_skipped"] == 1
    assert m["stats"]["skipped"][0]["prompt_id"] == "long"
    assert "prompt_too_long" in m["stats"]["skipped"][0]["reason"]
    assert m["rows"]["candidates"] == 6 and m["stats"]["generated_tokens"] > 0
    assert m["stats"]["prompts_dropped"] == {"empty_text": 1} and "1 dropped for an empty text" in first[2].stdout


def test_same_seed_same_candidates_whatever_the_batching(first):
    """Seeds belong to (prompt, candidate), not to batch positions: another batch size gives the same text.
    (A seed tied to a batch position would differ here: batch size 1 puts every candidate at position 0.)"""
    tmp, data, _ = first
    proc = run_stage(SCRIPT, CONFIG, *sets_for(data, tmp / "b", "engine.batch_size=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = rows(tmp / "a"), rows(tmp / "b")
    assert a.response.tolist() == b.response.tolist()
    assert a.response.nunique() > 1  # sampling really sampled


def test_rerun_reuses_complete_output(first):
    tmp, data, _ = first
    before = (tmp / "a" / "01_generate" / "manifest.json").read_text()
    proc = run_stage(SCRIPT, CONFIG, *sets_for(data, tmp / "a"))
    assert proc.returncode == 0 and "reusing the complete output" in proc.stdout
    assert (tmp / "a" / "01_generate" / "manifest.json").read_text() == before
