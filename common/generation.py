"""Generation with vLLM on Ray Data (`ray.data.llm`): stage 1 samples candidates with it, stage 4 decodes greedily
with it, and the LLM judges of stage 2 ask their questions through it.

Prompts are tokenised by a Ray Data map with the tokenizer's chat template (common.tokenize), so prompts longer than
the context are skipped and counted before they reach vLLM, never a crash. Each prompt is expanded to its `n`
candidates as separate rows, each with its own seed derived from (seed, prompt id, candidate index): one replica or
eight, first run or rerun, candidate k of prompt p is the same text.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import numpy as np

from common import schema as S
from common.config import EngineConfig, ModelConfig, SamplingConfig, require_model
from common.ray_setup import Ask
from common.tokenize import load_tokenizer, prompt_ids

MESSAGES = "_prompt_messages"  # our PROMPT column while it passes through the engine


def engine_asks(engine: EngineConfig, what: str = "vLLM engine replica") -> list[Ask]:
    if engine.accelerator_type:
        res = {"GPU": float(engine.tensor_parallel_size), f"accelerator_type:{engine.accelerator_type}": 0.001}
    else:
        res = {"CPU": engine.num_cpus}
    return [Ask(what, engine.concurrency, res)]


def candidate_seed(seed: int, prompt_id: str, k: int) -> int:
    return int(hashlib.sha1(f"{seed}:{prompt_id}:{k}".encode()).hexdigest()[:8], 16)


def _tokenize_prompts(batch: dict[str, np.ndarray], model_path: str, trust_remote_code: bool,
                      max_prompt_tokens: int) -> dict[str, np.ndarray]:
    tok = load_tokenizer(model_path, trust_remote_code)
    ids, reasons = [], []
    for messages in batch[S.PROMPT]:
        p = prompt_ids(tok, list(messages))
        ok = len(p) <= max_prompt_tokens
        ids.append(np.asarray(p if ok else [], dtype=np.int64))
        reasons.append("" if ok else f"prompt_too_long ({len(p)} > {max_prompt_tokens} tokens)")
    out = dict(batch)
    out[S.TOKENIZED] = np.empty(len(ids), dtype=object)
    out[S.TOKENIZED][:] = ids
    out[S.SKIP] = np.asarray(reasons, dtype=object)
    return out


def tokenize_prompts(ds, model: ModelConfig, max_tokens: int):
    """Adds TOKENIZED and SKIP columns; prompts that leave fewer than `max_tokens` for the answer are skipped."""
    path = require_model(model.path, "model.path")
    return ds.map_batches(
        _tokenize_prompts, batch_size=256, num_cpus=0.25,
        fn_kwargs=dict(model_path=path, trust_remote_code=model.trust_remote_code,
                       max_prompt_tokens=model.max_model_len - max_tokens),
    )


PROMPT_COLUMNS = (S.PROMPT, S.SOURCE, S.REFERENCE)  # what a candidate row can carry from its prompt


def _expand(row: dict[str, Any], n: int) -> list[dict[str, Any]]:
    if row[S.SKIP]:
        return []
    return [dict(row, **{S.CANDIDATE: k}) for k in range(n)]


def _cpu_env(engine: EngineConfig) -> dict[str, str]:
    env = {"VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gib)}
    if engine.cpu_reserved_cores is not None:  # vLLM keeps 1 core for its engine loop unless told otherwise
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(engine.cpu_reserved_cores)
    return env


def build_engine(model: ModelConfig, engine: EngineConfig, preprocess: Callable, postprocess: Callable):
    """A ray.data.llm processor over our own tokenised prompts (its chat-template/tokenize stages are off: one
    tokenisation, ours, with skips counted)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    on_cpu = engine.accelerator_type is None
    engine_kwargs = dict(
        max_model_len=model.max_model_len, dtype=model.dtype, trust_remote_code=model.trust_remote_code,
        tensor_parallel_size=engine.tensor_parallel_size, max_num_seqs=engine.max_num_seqs,
        enforce_eager=on_cpu,  # no CUDA graphs / compilation on CPU
        use_tqdm_on_load=False,  # its weight-loading bar is carriage-return debris in a log file or a forwarded log
        # vLLM's CPU worker cannot rewind a seeded sampler after a partial (chunked) prefill ("CPU Generator does
        # not use offset"), and every candidate here has its own seed: schedule whole prompts only.
        **({"enable_chunked_prefill": False} if on_cpu else {}),
    )
    engine_kwargs.update(engine.engine_kwargs)  # the config's engine_kwargs win
    cfg = vLLMEngineProcessorConfig(
        model_source=require_model(model.path, "model.path"),
        engine_kwargs=engine_kwargs,
        batch_size=engine.batch_size,
        concurrency=engine.concurrency,
        accelerator_type=engine.accelerator_type,
        # On CPU, vLLM must be told its bundle is a CPU, or it waits forever for a GPU.
        placement_group_config={"bundles": [{"CPU": engine.num_cpus}]} if on_cpu else None,
        runtime_env={"env_vars": _cpu_env(engine)} if on_cpu else None,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
    )
    return build_processor(cfg, preprocess=preprocess, postprocess=postprocess,
                           preprocess_map_kwargs={"num_cpus": 0.25}, postprocess_map_kwargs={"num_cpus": 0.25})


def _sampling_row(row: dict[str, Any], sampling: dict[str, Any], seed: int) -> dict[str, Any]:
    params = dict(sampling, n=1, seed=candidate_seed(seed, row[S.PROMPT_ID], int(row[S.CANDIDATE])))
    # In place: ray.data.llm merges our return value into the input row, and its vLLM stage would read our
    # chat-messages `prompt` column as a text prompt.
    if S.PROMPT in row:
        row[MESSAGES] = row.pop(S.PROMPT)
    row["sampling_params"] = params
    return row


def _candidate_row(row: dict[str, Any], max_tokens: int, carry: tuple[str, ...]) -> dict[str, Any]:
    return {
        S.PROMPT_ID: row[S.PROMPT_ID],
        **{c: row[MESSAGES if c == S.PROMPT else c] for c in carry},
        S.CANDIDATE: int(row[S.CANDIDATE]),
        S.RESPONSE: row["generated_text"].strip(),
        S.NUM_PROMPT_TOKENS: int(row["num_input_tokens"]),
        S.NUM_RESPONSE_TOKENS: int(row["num_generated_tokens"]),
        S.FINISH_REASON: "length" if row["num_generated_tokens"] >= max_tokens else "stop",
    }


def generate(tokenized_ds, model: ModelConfig, engine: EngineConfig, sampling: SamplingConfig,
             carry: tuple[str, ...] = PROMPT_COLUMNS):
    """Prompt rows (with TOKENIZED/SKIP) -> one row per candidate (see common.schema), with the prompt's `carry`
    columns (of PROMPT_COLUMNS). Lazy: nothing runs until the dataset is consumed."""
    params = dict(temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                  stop=list(sampling.stop) or None)
    # Columns not carried are dropped before the n-fold expansion: they never pass through the engine.
    slim = tokenized_ds.select_columns([S.PROMPT_ID, S.TOKENIZED, S.SKIP, *carry])
    expanded = slim.flat_map(_expand, fn_kwargs=dict(n=sampling.n), num_cpus=0.25)
    processor = build_engine(
        model, engine,
        preprocess=lambda row: _sampling_row(row, params, sampling.seed),
        postprocess=lambda row: _candidate_row(row, sampling.max_tokens, carry),
    )
    return processor(expanded)
