"""The decoupled reference model: a Ray Data `map_batches` actor pool that adds reference log-probs to each pair.

LLMForge's `logprob_processor_scaling_config` keeps its meaning: `custom_resources` (e.g. accelerator_type:A10G)
place each actor, `concurrency` is the pool size, `batch_size` the pairs per call. The pool's output streams into
the trainers through `ray.train.get_dataset_shard`, so the reference forward of later blocks overlaps the policy
update of earlier ones, and no trainer process ever holds the reference model.

Two backends score the same tokens (the ids come from common.tokenize, upstream of this actor):
- `transformers` (default): `common.dpo_loss.model_logps`, the trainer's own function: one unpadded forward per
  sequence (prompt+chosen, prompt+rejected), so `batch_size` never changes a log-prob and at step 0 the policy
  (initialised from this model) reproduces them exactly.
- `vllm`: vLLM's `prompt_logprobs` over the same ids, with tensor parallelism for a reference larger than one GPU.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common import schema as S


def record_provenance(folder: str | None, **extra) -> None:
    """One small JSON per Ray worker process (reference actor or trainer): its pid, Ray node and the Ray resources
    it was given, so stage 3's manifest shows where each ran."""
    if not folder:
        return
    import json

    import ray

    Path(folder).mkdir(parents=True, exist_ok=True)
    ctx = ray.get_runtime_context()
    info = {"pid": os.getpid(), "node_id": ctx.get_node_id(), "resources": ctx.get_assigned_resources(), **extra}
    (Path(folder) / f"{os.getpid()}.json").write_text(json.dumps(info))


def _out(batch, chosen, rejected, n_chosen, n_rejected):
    batch[S.REF_CHOSEN_LOGPS] = np.asarray(chosen, dtype=np.float64)
    batch[S.REF_REJECTED_LOGPS] = np.asarray(rejected, dtype=np.float64)
    batch[S.REF_CHOSEN_TOKENS] = np.asarray(n_chosen, dtype=np.int64)
    batch[S.REF_REJECTED_TOKENS] = np.asarray(n_rejected, dtype=np.int64)
    batch[S.REF_PID] = np.full(len(chosen), os.getpid(), dtype=np.int64)
    return batch


class ReferenceLogProbProcessor:
    """Loads the frozen reference once per actor; `__call__` returns the batch plus TRL's `ref_chosen_logps` /
    `ref_rejected_logps` (summed over response tokens)."""

    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 provenance_dir: str | None = None, attn_implementation: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation).eval()
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.pad_id = self.model.config.pad_token_id or 0
        from common.dpo_loss import supports_logits_to_keep

        self.window = supports_logits_to_keep(self.model)
        record_provenance(provenance_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from common.dpo_loss import model_logps
        from common.tokenize import collate_pairs

        ids, attn, mask = collate_pairs(batch[S.PROMPT_IDS], batch[S.CHOSEN_IDS], batch[S.REJECTED_IDS], self.pad_id)
        dev = self.model.device
        with self.torch.inference_mode():
            logps, ntok, _ = model_logps(self.model, ids.to(dev), attn.to(dev), mask.to(dev), self.window)
        b = len(batch[S.PROMPT_IDS])
        logps, ntok = logps.float().cpu().numpy(), ntok.cpu().numpy()
        return _out(batch, logps[:b], logps[b:], ntok[:b], ntok[b:])


class VLLMReferenceLogProbProcessor:
    """The same numbers from vLLM's `prompt_logprobs`: the response tokens are scored as part of the prompt, so one
    prefill per sequence and no sampling. `tensor_parallel_size > 1` spreads a large reference over GPUs."""

    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1, max_model_len: int = 2048, provenance_dir: str | None = None):
        from vllm import LLM, SamplingParams

        record_provenance(provenance_dir)
        on_cpu = not _has_cuda()
        if on_cpu:  # else vLLM claims 92% of the host's memory for its KV cache
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.llm = LLM(model_path, dtype=dtype, trust_remote_code=trust_remote_code, enforce_eager=on_cpu,
                       tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                       enable_prefix_caching=False,
                       # Inside a Ray actor vLLM would otherwise pick its Ray executor and ask Ray for a placement
                       # group this actor already holds the resources of: it would wait forever.
                       distributed_executor_backend="mp")
        # prompt_logprobs=0: the logprob of each actual prompt token, nothing else.
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vllm.inputs import TokensPrompt

        prompts, spans = [], []
        for p, c, r in zip(batch[S.PROMPT_IDS], batch[S.CHOSEN_IDS], batch[S.REJECTED_IDS]):
            for resp in (c, r):
                prompts.append(TokensPrompt(prompt_token_ids=[int(t) for t in (*p, *resp)]))
                spans.append((len(p), len(resp)))
        outs = self.llm.generate(prompts, self.params, use_tqdm=False)
        sums = []
        for out, (n_p, n_r) in zip(outs, spans):
            ids = out.prompt_token_ids
            lp = out.prompt_logprobs  # position i: {token_id: Logprob} for token i (None at position 0)
            sums.append(sum(lp[i][ids[i]].logprob for i in range(n_p, n_p + n_r)))
        sums = np.asarray(sums)
        n_c = [len(c) for c in batch[S.CHOSEN_IDS]]
        n_r = [len(r) for r in batch[S.REJECTED_IDS]]
        return _out(batch, sums[0::2], sums[1::2], n_c, n_r)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def add_reference_logps(ds, cfg, model_path: str, provenance_dir: str | None = None):
    """Attach the reference actor pool to `ds` (lazy). `cfg` is the stage-3 config."""
    import ray

    sc = cfg.preference_tuning_config.logprob_processor_scaling_config
    ptc = cfg.preference_tuning_config
    lo, hi = (sc.concurrency, sc.concurrency) if isinstance(sc.concurrency, int) else sc.concurrency
    kwargs = dict(model_path=model_path, dtype=cfg.dtype, provenance_dir=provenance_dir,
                  attn_implementation=cfg.attn_implementation)
    cls = ReferenceLogProbProcessor
    if ptc.reference_backend == "vllm":
        cls = VLLMReferenceLogProbProcessor
        kwargs.pop("attn_implementation")  # vLLM picks its own attention kernels
        kwargs.update(tensor_parallel_size=ptc.reference_tensor_parallel_size, max_model_len=cfg.context_length + 1)
    return ds.map_batches(
        cls,
        fn_constructor_kwargs=kwargs,
        batch_size=sc.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        num_cpus=sc.num_cpus,
        num_gpus=sc.num_gpus or None,
        resources=dict(sc.custom_resources) or None,
        # A killed actor is restarted and its in-flight batches retried: every pair is still seen once.
        max_restarts=-1,
        max_task_retries=-1,
    )
