"""Synthetic stage-1 output for scale benchmarks and tests (issue 20): `<out>/01_generate/` as 01_generate writes it.

    .venv/bin/python benchmarks/make_candidates.py --out /tmp/judge_scale/20k --candidates 20000
    .venv/bin/python benchmarks/make_candidates.py --out /tmp/big --candidates 4000 --source-bytes 80000

Same layout, columns and types as stage 1 (common.schema): the candidates (PROMPT_ID, CANDIDATE, RESPONSE, token
counts, FINISH_REASON) in several parquet files under data/, the prompts (PROMPT_ID, PROMPT as chat messages holding
the source, SOURCE, REFERENCE) once each under prompts.parquet/ (with --inline, on every candidate instead, as stage
1 wrote them before prompts.parquet), and a manifest
written by common.io.StageOutput itself (the quickstart's stage-1 config with output_dir and sampling.n set), so
`02_judge/judge.py --set output_dir=<out>` reads it like a real run. No model: the texts are common words in
random order.

Every prompt has `--per-prompt` candidates and a distinct source of about `--source-bytes` (default 11 kB, an
ACLSum-size article, ~2.3k tokens of SmolLM2). Responses vary in length (mostly 8-120 words) and some are made to
trip stage 2's filters: empty, too short, too long, markup characters, and exact duplicates of a sibling.
Deterministic for a seed; one parquet file generated at a time, vectorised with numpy/pyarrow except one string
slice per text.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import schema as S  # noqa: E402
from common.config import REPO, load_config  # noqa: E402
from common.io import StageOutput, read_manifest  # noqa: E402
from common.per_prompt import PROMPTS_FILE  # noqa: E402

STAGE = "01_generate"
TEMPLATE = "Summarize this abstract in one or two sentences.\n\n"  # the quickstart's, before {text}
MAX_TOKENS = 96  # a response this many tokens long "hit max_tokens" (FINISH_REASON = "length")
# Shares of candidates made to trip a stage-2 filter (the rest are ordinary responses).
ODD = {"empty": 0.02, "too_short": 0.03, "too_long": 0.03, "invalid_chars": 0.02, "duplicate": 0.05}


# Common English and paper words: tokenisers split them about as they split an abstract (~1.3 tokens a word), so
# stage 3's tokeniser sees ACLSum-like token counts (random letters would be ~3 tokens a word).
WORDS = """the of and to a in is that for we on with as this are by be an our from which it model
models can language data results these task show using based at not or also paper have two performance their
new approach method has more than such training text its used learning between other when one both been set
neural while each translation work into however propose word information system different use evaluation
large only how study first tasks systems features dataset shows research analysis over generation may most
human do three english well structure semantic corpus proposed they across existing embeddings representations
state improve previous network effective sentence knowledge quality accuracy domain multiple questions answer
significant experiments further level sentences entity recent methods approaches framework source target
summarization summary summaries abstract article articles document documents readers length short long
evidence annotation annotated benchmark baseline baselines outperforms compared improvements improvement
achieve achieves within without among through about under after before during where because since though
any all some many most few several various high low better best good strong weak small general specific
process processing natural linguistic context contextual pretrained fine tuned tuning transfer cross lingual
multilingual speech dialogue generate generated generating output input encoder decoder attention layer
layers transformer parameters objective loss function training trained test validation split scores score
metric metrics human judgments correlation reference references faithful faithfulness factual consistency
errors error rate precision recall labels label classification supervised unsupervised zero shot prompt
prompts instruction instructions reasoning step steps chain large scale resource resources low languages""".split()


def _corpus(rng: np.random.Generator, words: int = 400_000) -> tuple[str, np.ndarray]:
    """A long text of common words drawn by a Zipf-like law (ASCII: a char is a byte), and where each word starts."""
    p = 1.0 / np.arange(1, len(WORDS) + 1)
    text = " ".join(np.array(WORDS)[rng.choice(len(WORDS), size=words, p=p / p.sum())]) + " "
    starts = np.flatnonzero(np.frombuffer(text.encode(), np.uint8) == ord(" ")) + 1
    return text, np.concatenate([[0], starts[:-1]])


def _spans(text: str, starts: np.ndarray, first: np.ndarray, count: np.ndarray) -> list[str]:
    """Word spans of the corpus: words first[i] .. first[i] + count[i] - 1 (count 0: "")."""
    lo, hi = starts[first], starts[np.minimum(first + count, len(starts) - 1)]
    return [text[a:b].rstrip() for a, b in zip(lo.tolist(), hi.tolist())]


def _response_words(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Word count of each response, and which filter (if any) it is made to trip (index into ODD, -1 = none)."""
    words = np.clip(rng.lognormal(np.log(40), 0.6, size=n), 8, 150).astype(np.int64)
    kind = np.full(n, -1)
    u = rng.random(n)
    edges = np.cumsum(list(ODD.values()))
    for k, hi in enumerate(edges):
        kind[(u < hi) & (kind == -1)] = k
    names = list(ODD)
    words[kind == names.index("empty")] = 0
    short = kind == names.index("too_short")
    words[short] = rng.integers(1, 5, size=short.sum())
    long = kind == names.index("too_long")
    words[long] = rng.integers(210, 320, size=long.sum())
    return words, kind


def make_table(corpus: tuple[str, np.ndarray], first_prompt: int, prompts: int, per_prompt: int,
               source_bytes: int, rng: np.random.Generator) -> tuple[pa.Table, pa.Table]:
    """(the prompts first_prompt .. first_prompt + prompts - 1, their candidates sorted by (PROMPT_ID, CANDIDATE))."""
    text, starts = corpus
    candidates = prompts * per_prompt
    mean_word = len(text) / len(starts)
    src_words = np.maximum(1, rng.normal(source_bytes, source_bytes * 0.1, size=prompts) / mean_word).astype(np.int64)
    src_words = np.minimum(src_words, len(starts) // 2)
    ids = [f"synth-{i:08d}" for i in range(first_prompt, first_prompt + prompts)]
    # A prompt id up front makes every source distinct, as real articles are.
    sources = pa.array([f"{pid} {s}" for pid, s in zip(ids, _spans(
        text, starts, rng.integers(0, len(starts) - src_words), src_words))], pa.string())
    content = pc.binary_join_element_wise(pa.scalar(TEMPLATE), sources, "")

    prompt_of = np.arange(candidates) // per_prompt
    cand = np.arange(candidates) % per_prompt
    words, kind = _response_words(rng, candidates)
    responses = _spans(text, starts, rng.integers(0, len(starts) - 400, size=candidates), words)
    names = list(ODD)
    for i in np.flatnonzero(kind == names.index("invalid_chars")):
        responses[i] = "## " + responses[i]
    for i in np.flatnonzero((kind == names.index("duplicate")) & (cand > 0)):
        responses[i] = responses[i - 1]  # an exact copy of its sibling: the duplicate filter's case
        words[i] = words[i - 1]

    take = pa.array(prompt_of)
    messages = pa.ListArray.from_arrays(
        pa.array(np.arange(prompts + 1, dtype=np.int32)),
        pa.StructArray.from_arrays([pa.array(["user"] * prompts), content], ["role", "content"]))
    prompt_tokens = (pc.binary_length(content).to_numpy() // 4).astype(np.int64)
    response_tokens = (words * 1.3).astype(np.int64)
    prompt_table = pa.table({S.PROMPT_ID: pa.array(ids), S.PROMPT: messages, S.SOURCE: sources,
                             S.REFERENCE: pa.array([""] * prompts, pa.string())})
    return prompt_table, pa.table({
        S.PROMPT_ID: pa.array(ids).take(take),
        S.CANDIDATE: pa.array(cand, pa.int64()),
        S.RESPONSE: pa.array(responses, pa.string()),
        S.NUM_PROMPT_TOKENS: pa.array(prompt_tokens[prompt_of]),
        S.NUM_RESPONSE_TOKENS: pa.array(response_tokens),
        S.FINISH_REASON: pa.array(np.where(response_tokens >= MAX_TOKENS, "length", "stop")),
    })


def write_files(so: StageOutput, candidates: int, per_prompt: int, source_bytes: int, files: int, seed: int,
                inline: bool = False) -> dict:
    """The parquet files, one generated at a time (1M candidates hold ~20 GB in Arrow); totals for the manifest.
    File k's rows come from a generator seeded by (seed, k): the same parameters give the same bytes."""
    corpus = _corpus(np.random.default_rng(seed))
    prompts = -(-candidates // per_prompt)
    per_file = -(-prompts // files)  # whole prompts per file, as stage 1's blocks mostly keep them
    totals = {"generated_tokens": 0, "hit_max_tokens": 0}
    if not inline:
        so.path(PROMPTS_FILE).mkdir()
    for k, lo in enumerate(range(0, prompts, per_file)):
        prompt_table, table = make_table(corpus, lo, min(per_file, prompts - lo), per_prompt, source_bytes,
                                         np.random.default_rng([seed, k]))
        if inline:  # stage 1's layout before prompts.parquet: the prompt's columns on each of its candidates
            at = pc.index_in(table.column(S.PROMPT_ID), prompt_table.column(S.PROMPT_ID))
            extra = prompt_table.drop_columns([S.PROMPT_ID]).take(at)
            table = pa.Table.from_arrays(table.columns[:1] + extra.columns + table.columns[1:],
                                         names=table.column_names[:1] + extra.column_names + table.column_names[1:])
        else:
            pq.write_table(prompt_table, so.path(PROMPTS_FILE) / f"part-{k:05d}.parquet")
        pq.write_table(table, so.data / f"part-{k:05d}.parquet")
        totals["generated_tokens"] += int(pc.sum(table.column(S.NUM_RESPONSE_TOKENS)).as_py())
        totals["hit_max_tokens"] += int(pc.sum(pc.equal(table.column(S.FINISH_REASON), "length")).as_py())
    return totals


def params(candidates: int, per_prompt: int, source_bytes: int, files: int, seed: int, inline: bool) -> dict:
    return dict(candidates=candidates, per_prompt=per_prompt, source_bytes=source_bytes, files=files, seed=seed,
                inline=inline)


def existing(out: str | Path, wanted: dict) -> dict | None:
    """The manifest of a complete synthetic output made with the same parameters, else None."""
    try:
        m = read_manifest(Path(out) / STAGE, STAGE)
    except Exception:  # noqa: BLE001  (missing, incomplete or changed: make it again)
        return None
    return m if m.get("stats", {}).get("synthetic") == wanted else None


def make_candidates(out: str | Path, candidates: int, per_prompt: int = 4, source_bytes: int = 11_000,
                    files: int = 0, seed: int = 0, force: bool = False, inline: bool = False) -> dict:
    """Write `<out>/01_generate/` (reused if it holds the same parameters, unless `force`); its manifest.
    `candidates` is rounded up to whole prompts."""
    candidates = -(-candidates // per_prompt) * per_prompt
    files = files or max(4, -(-candidates // 25_000))
    wanted = params(candidates, per_prompt, source_bytes, files, seed, inline)
    if not force and (m := existing(out, wanted)):
        print(f"[make_candidates] reusing {m['dir']} ({candidates} candidates)", flush=True)
        return m
    t0 = time.time()
    cfg = load_config(STAGE, str(REPO / "configs/quickstart/01_generate.yaml"),
                      [f"output_dir={out}", f"sampling.n={per_prompt}", f"sampling.max_tokens={MAX_TOKENS}"])
    so = StageOutput(cfg, STAGE, upstream={"dir": "synthetic:benchmarks/make_candidates.py",
                                           "fingerprint": json.dumps(wanted, sort_keys=True)}, force=True)
    so.begin()
    totals = write_files(so, candidates, per_prompt, source_bytes, files, seed, inline)
    seconds = round(time.time() - t0, 1)
    prompts = candidates // per_prompt
    stats = {"synthetic": wanted, "prompts": prompts, "prompts_skipped": 0, "prompts_dropped": {"empty_text": 0},
             "skipped": [], "candidates": candidates, **totals,
             "tokens_per_second": 0.0, "generate_seconds": seconds}
    manifest = so.commit(rows={"candidates": candidates, "prompts": prompts}, stats=stats)
    size = sum(f.stat().st_size for f in (so.final / "data").iterdir())
    print(f"[make_candidates] {candidates} candidates ({prompts} prompts x {per_prompt}, sources ~{source_bytes} B) "
          f"in {seconds}s: {size / 2**20:.0f} MiB of parquet in {manifest['dir']}", flush=True)
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="the output_dir: writes <out>/01_generate/")
    p.add_argument("--candidates", type=int, default=20_000)
    p.add_argument("--per-prompt", type=int, default=4, help="candidates per prompt (stage 1's sampling.n)")
    p.add_argument("--source-bytes", type=int, default=11_000, help="mean source size (an ACLSum article: ~11 kB)")
    p.add_argument("--files", type=int, default=0, help="parquet files (0: one per 25k candidates, at least 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write it again even if the same parameters are there")
    p.add_argument("--inline", action="store_true", help="stage 1's older layout: the prompt on every candidate")
    a = p.parse_args()
    make_candidates(a.out, a.candidates, a.per_prompt, a.source_bytes, a.files, a.seed, a.force, a.inline)


if __name__ == "__main__":
    main()
