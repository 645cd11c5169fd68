"""One schema for every stage config, and the loader that turns a YAML file + `--set` overrides into it.

Every key has a default, unknown keys are errors (with the closest valid key suggested), and any problem is one
line naming the YAML file: `load_config` raises `UserError`, which the stage's `cli` wrapper turns into exit 2.
Stage 3's keys take LLMForge's DPO names where the two share a setting (`preference_tuning_config`,
`logprob_processor_scaling_config`, `num_data_blocks_per_device`, `lora_config`, `model_id`, ...); it is not a
verbatim copy: some LLMForge keys are mapped (`deepspeed` -> FSDP sharding, `flash_attention_2` ->
attn_implementation), the rest are refused in one line naming the replacement (LLMFORGE_REFUSED); some are our own.
docs/migrating-from-llmforge.md lists every key.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import UserError

REPO = Path(__file__).resolve().parent.parent


class Base(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ---------------------------------------------------------------- shared blocks
class RayConfig(Base):
    address: Optional[str] = None  # None: start a local Ray; "auto": join the cluster this runs on
    num_cpus: Optional[float] = Field(default=None, gt=0)  # local Ray only; None = all cores (0 would hang)
    # Declared on a local Ray so GPU-shaped configs (accelerator_type:A10G ...) schedule for real on a laptop.
    local_resources: dict[str, float] = {"accelerator_type:A10G": 8.0, "accelerator_type:A100": 8.0}
    env_vars: dict[str, str] = {}  # extra env vars for every Ray worker
    # Ray Data's shuffle for groupby / sort (stages 2 and 3). "sort": tasks only, which start at once and hold no
    # CPU between shuffles; "ray": Ray Data's own default (hash-based, with aggregator actors: built for many nodes).
    shuffle: Literal["sort", "ray"] = "sort"


class DataConfig(Base):
    path: str = "data/aclsum/train.jsonl"  # jsonl, parquet, a folder of either, or a `save_to_disk` folder
    # our name -> your column. `id` is optional (a stable hash of the text is used), `reference` is optional.
    # Give `messages` instead of `text` when the column already holds chat messages.
    columns: dict[str, str] = {"id": "id", "text": "abstract"}
    limit: Optional[int] = Field(default=None, gt=0)  # first N rows only (quick runs)

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v):
        bad = set(v) - {"id", "text", "messages", "reference"}
        if bad:
            raise ValueError(f"unknown column role(s) {sorted(bad)}; roles are id, text, messages, reference")
        if ("text" in v) == ("messages" in v):
            raise ValueError("map exactly one of `text` or `messages` to a column")
        return v


class PromptConfig(Base):
    system: Optional[str] = None  # optional system message
    template: str = "{text}"  # user message; {text} is the mapped text column

    @field_validator("template")
    @classmethod
    def _has_text(cls, v):
        if "{text}" not in v:
            raise ValueError("the template must contain {text}")
        try:  # {text} is the only placeholder: a column name in braces would fail on the first row, after Ray starts
            v.format(text="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"the template can only use {{text}}, not {{{e.args[0] if e.args else ''}}} (write "
                             f"literal braces as {{{{ }}}})") from None
        return v


class ModelConfig(Base):
    path: str = "models/smollm2-135m-instruct"  # a local HF folder (or a hub id on a cluster with network)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    max_model_len: int = Field(default=2048, gt=0)  # prompt + response tokens; longer prompts are skipped
    trust_remote_code: bool = False  # off by default: runs code shipped with the model


class EngineConfig(Base):
    """vLLM replicas on Ray Data (`ray.data.llm`): one block per model, like the Anyscale scaling_config."""

    batch_size: int = Field(default=64, gt=0)  # rows per Ray Data batch sent to one replica
    concurrency: int = Field(default=1, gt=0)  # vLLM replicas (data parallel)
    tensor_parallel_size: int = Field(default=1, gt=0)  # GPUs per replica
    accelerator_type: Optional[str] = None  # e.g. A10G; None = CPU (the default here)
    num_cpus: float = Field(default=1.0, gt=0)  # CPU bundle per replica when accelerator_type is None
    kv_cache_gib: int = Field(default=1, gt=0)  # CPU only: VLLM_CPU_KVCACHE_SPACE
    cpu_reserved_cores: Optional[int] = Field(default=None, ge=0)  # CPU only: VLLM_CPU_NUM_OF_RESERVED_CPU
    max_num_seqs: int = Field(default=128, gt=0)  # sequences decoded together; higher -> more KV memory
    engine_kwargs: dict[str, Any] = {}  # passed to vLLM as is


class SamplingConfig(Base):
    n: int = Field(default=4, gt=0)  # candidates per prompt
    temperature: float = Field(default=0.8, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_tokens: int = Field(default=128, gt=0)
    stop: list[str] = []
    seed: int = 0  # candidate k of prompt p always gets the same seed: reruns give the same text

    @model_validator(mode="after")
    def _greedy_means_one(self):
        if self.temperature == 0 and self.n > 1:
            raise ValueError("temperature 0 (greedy) gives n identical candidates; set n: 1 or temperature > 0")
        return self


class StageBase(Base):
    output_dir: str = "outputs/quickstart"  # each stage writes <output_dir>/<NN_stage>/
    ray: RayConfig = RayConfig()

    @field_validator("ray")
    @classmethod
    def _shared_output_dir(cls, v, info):
        # On a cluster every node writes under output_dir, and a `ray job submit` job runs in a temporary copy of
        # the code, where a relative path would resolve and its outputs vanish with it.
        out = info.data.get("output_dir")
        if v.address and out and not Path(out).expanduser().is_absolute():
            raise ValueError(f"output_dir {out} is relative, but with ray.address set it must be an absolute path "
                             f"on storage every node sees (e.g. /mnt/cluster_storage/run)")
        return v


# ---------------------------------------------------------------- stage 1
class GenerateConfig(StageBase):
    data: DataConfig = DataConfig()
    prompt: PromptConfig = PromptConfig()
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    sampling: SamplingConfig = SamplingConfig()

    @model_validator(mode="after")
    def _room_for_a_prompt(self):
        if self.sampling.max_tokens >= self.model.max_model_len:
            raise ValueError(f"sampling.max_tokens ({self.sampling.max_tokens}) leaves no room for a prompt within "
                             f"model.max_model_len ({self.model.max_model_len}); lower sampling.max_tokens or raise "
                             f"model.max_model_len")
        return self


# ---------------------------------------------------------------- stage 2
class SimilarityJudgeConfig(Base):
    """SCORE = cosine similarity of response and source embeddings (faithfulness) minus copy_penalty x the share of
    the response's 4-grams found in the source; length is the pairing rule's."""

    embedder: str = "models/all-MiniLM-L6-v2"  # sentence-transformers folder
    # A copy of the source has cosine ~1: without this it is the most "faithful" summary (docs/stage2.md)
    copy_penalty: float = Field(default=0.5, ge=0)
    batch_size: int = Field(default=64, gt=0)  # responses per actor call
    concurrency: int = Field(default=1, gt=0)  # embedder actors
    num_cpus: float = Field(default=0.5, gt=0)  # per embedder actor; fractional so a read task fits beside it


class LLMJudgeConfig(Base):
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    max_tokens: int = Field(default=512, gt=0)  # longest judge reply (quiz questions need the most)
    temperature: float = Field(default=0.0, ge=0)
    guided_json: bool = True  # ask vLLM for JSON-schema-constrained output


class QuizConfig(Base):
    num_questions: int = Field(default=5, gt=0)  # questions written per source text
    num_options: int = Field(default=5, ge=2, le=26)  # choices per question
    # Placeholders: {source} {num_questions} {num_options} {letters} {last_letter}
    question_prompt: str = (
        "Write {num_questions} multiple-choice questions that test the key facts of the text below. Each question"
        " has exactly {num_options} options, labelled {letters}, and exactly one correct answer."
        '\n\nReply with JSON only: {{"questions": [{{"question": "...", "options": ["...", ...],'
        ' "answer": "A"}}, ...]}}\n\nText:\n{source}'
    )
    # Placeholders: {response} {questions} {num_questions} {letters} {last_letter}. The questions come before the
    # response, so the n responses to one source share a prompt prefix (vLLM prefix caching reuses it).
    answer_prompt: str = (
        "Answer these questions using only the summary that follows them, not what you know. If the summary does"
        ' not say, answer "unsure".\n\nQuestions:\n{questions}\n\nSummary:\n{response}\n\nReply with JSON'
        ' only, one answer per question, in order: {{"answers": ["A", "unsure", ...]}} (each one of {letters} or'
        " unsure)"
    )

    @staticmethod
    def check_template(template: str, allowed: tuple[str, ...]) -> str:
        """A prompt template must format with exactly these placeholders (literal braces written {{ }})."""
        try:
            template.format(**{k: "" for k in allowed})
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"cannot fill the prompt template ({type(e).__name__}: {e}); placeholders are "
                             f"{', '.join('{' + k + '}' for k in allowed)}, write literal braces as {{{{ and }}}}")
        return template

    @field_validator("question_prompt")
    @classmethod
    def _question_prompt(cls, v):
        return cls.check_template(v, ("source", "num_questions", "num_options", "letters", "last_letter"))

    @field_validator("answer_prompt")
    @classmethod
    def _answer_prompt(cls, v):
        return cls.check_template(v, ("response", "questions", "num_questions", "letters", "last_letter"))


class RubricConfig(Base):
    # Placeholders: {source} {response} {scale_max}; the reply format ({"score": n}) is appended.
    prompt: str = (
        "Rate how well the summary captures the source faithfully and concisely, from 1 (bad) to {scale_max}"
        " (excellent).\n\nSource:\n{source}\n\nSummary:\n{response}"
    )
    scale_max: int = Field(default=10, gt=1)
    pairwise: bool = False  # A/B mode: ask both orders, keep only consistent verdicts
    # Pairwise mode. Placeholders: {source} {a} {b}; the reply format ({"winner": "A"|"B"|"tie"}) is appended.
    pairwise_prompt: str = (
        "Which summary captures the source more faithfully and concisely?\n\nSource:\n{source}"
        "\n\nSummary A:\n{a}\n\nSummary B:\n{b}"
    )

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        return QuizConfig.check_template(v, ("source", "response", "scale_max"))

    @field_validator("pairwise_prompt")
    @classmethod
    def _pairwise_prompt(cls, v):
        return QuizConfig.check_template(v, ("source", "a", "b"))


class JudgeConfig(Base):
    type: Literal["similarity", "rubric", "quiz", "length"] = "similarity"  # a new judge: common/judges/__init__.py
    similarity: SimilarityJudgeConfig = SimilarityJudgeConfig()
    llm: LLMJudgeConfig = LLMJudgeConfig()  # the judge model for `rubric` and `quiz`
    quiz: QuizConfig = QuizConfig()
    rubric: RubricConfig = RubricConfig()


class FilterConfig(Base):
    min_words: int = Field(default=5, ge=0)
    max_words: int = Field(default=200, gt=0)
    invalid_chars: str = r"[<>{}\[\]|\\^~`#*_]|<\|"  # regex: a match removes the candidate ("" = off)
    drop_empty: bool = True  # blank responses are removed
    drop_duplicates: bool = True  # identical texts of one prompt are kept once

    @field_validator("invalid_chars")
    @classmethod
    def _compiles(cls, v):
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression ({e})") from None
        return v


class PairingConfig(Base):
    """Anyscale's rule: if either is below `quality_threshold`, higher quality wins (by at least
    `quality_margin`); otherwise the shorter wins when at least `min_length_gap` words shorter."""

    quality_threshold: float = 3.0  # on the judge's SCORE scale (quiz: correct answers; similarity: cosine)
    quality_margin: float = Field(default=0.0, ge=0)  # quality differences up to this are noise: no winner
    min_length_gap: int = Field(default=3, ge=0)  # words
    # Both above the threshold: the shorter wins only if it scores at most this much lower; past it the more
    # faithful wins. None = Anyscale's rule (the shorter wins whatever its score).
    max_score_drop: Optional[float] = Field(default=None, ge=0)
    max_pairs_per_prompt: int = Field(default=3, gt=0)
    # Share of prompts whose pairs are held out for stage 3's validation (all of a prompt's pairs on one side, so
    # the eval loss measures prompts the policy never trained on); 0 = none.
    valid_fraction: float = Field(default=0.0, ge=0, lt=0.5)


class JudgeStageConfig(StageBase):
    input_dir: str = "${output_dir}/01_generate"
    judge: JudgeConfig = JudgeConfig()
    filters: FilterConfig = FilterConfig()
    pairing: PairingConfig = PairingConfig()
    seed: int = 0


# ---------------------------------------------------------------- stage 3 (LLMForge-compatible keys)
class LogprobProcessorScalingConfig(Base):
    custom_resources: dict[str, float] = {"accelerator_type:A10G": 0.001}  # per reference actor
    concurrency: Union[int, tuple[int, int]] = 1  # reference actors (int, or (min, max) to autoscale)
    batch_size: int = Field(default=4, gt=0)  # pairs per reference forward
    num_cpus: float = Field(default=0.5, gt=0)  # per actor; fractional so 2 cores never deadlock
    # per actor; "auto" (as LLMForge): 1 when the Ray cluster has GPUs, else 0 (resolved once Ray is up)
    num_gpus: Union[Literal["auto"], float] = "auto"

    @field_validator("num_gpus")
    @classmethod
    def _gpus(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("num_gpus must be >= 0 or auto")
        return v

    @field_validator("concurrency")
    @classmethod
    def _positive(cls, v):
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 1 or hi < lo:
            raise ValueError("concurrency must be a positive int or (min, max) with 1 <= min <= max")
        return v


class PreferenceTuningConfig(Base):
    beta: float = Field(default=0.1, gt=0)  # higher keeps the policy closer to the reference
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"  # TRL's names
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)  # `robust` only: assumed label noise
    logprob_processor_scaling_config: LogprobProcessorScalingConfig = LogprobProcessorScalingConfig()
    reference_backend: Literal["transformers", "vllm"] = "transformers"  # vllm: prompt_logprobs, with TP
    reference_tensor_parallel_size: int = Field(default=1, gt=0)  # vllm backend: GPUs per reference
    step0_tolerance: float = Field(default=0.05, gt=0)  # warn if |policy - ref| log-probs differ more at step 0


class LoraConfig(Base):
    """peft's `LoraConfig`, handed to it as is (`peft.LoraConfig(**lora_config)`). The keys below carry the recipe's
    defaults; any other key peft's LoraConfig takes (use_dora, use_rslora, rank_pattern, ...) is passed through."""

    model_config = ConfigDict(extra="allow")
    r: int = Field(default=8, gt=0)
    lora_alpha: int = Field(default=16, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _peft_keys(cls, data):
        extra = sorted(set(data) - set(cls.model_fields)) if isinstance(data, dict) else []
        if not extra:
            return data
        import dataclasses

        import peft  # only for keys beyond ours: it imports torch

        valid = [f.name for f in dataclasses.fields(peft.LoraConfig) if f.init]
        for key in extra:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"did you mean 'lora_config.{close[0]}'?" if close else "not a key of peft's LoraConfig"
                raise ValueError(f"unknown key '{key}' ({hint})")
        return data


class LoggerConfig(Base):
    """LLMForge's `logger` block: `provider` joins `report_to`; `provider_config` goes to the tracker (wandb: the
    kwargs of `wandb.init`; mlflow: the keys in common.tracking.MLFLOW_KEYS)."""

    provider: Literal["wandb", "mlflow"]
    provider_config: dict[str, Any] = {}


# DeepSpeed ZeRO stage -> the FSDP sharding that keeps the same states sharded (torch's ShardingStrategy names).
# ZeRO-1 shards optimizer states only; FSDP has no such mode, SHARD_GRAD_OP (grads too) is the nearest.
ZERO_TO_FSDP = {3: ("fsdp", "FULL_SHARD"), 2: ("fsdp", "SHARD_GRAD_OP"), 1: ("fsdp", "SHARD_GRAD_OP"),
                0: ("ddp", None)}
FSDP_WORDS = {"FULL_SHARD": "full shard", "SHARD_GRAD_OP": "shard grad+optimizer", None: "replicated"}

# LLMForge keys that have no counterpart here: each is refused in one line naming what to use instead.
LLMFORGE_REFUSED = {
    "classifier_config": "LLM classifiers are not trained here (DPO only); use task: preference_tuning",
    "generation_config": "the prompt format is the model's own chat template (tokenizer_config.json); give a "
                         "model_id whose template you want, or edit its chat_template",
    "embedding_scaling_technique": "context extension is not done here; pick a model whose context covers "
                                   "context_length",
    "liger_kernel": "Liger kernels are not used here; use gradient_checkpointing: true (or "
                    "attn_implementation) to save memory",
    "initial_base_model_ckpt_path": "give that checkpoint folder as model_id",
    "initial_adapter_model_ckpt_path": "merge the adapter into its base (peft merge_and_unload) and give the "
                                       "merged folder as model_id",
    "optimizer_config": "the optimizer is AdamW; use learning_rate, weight_decay, lr_scheduler_type, "
                        "warmup_steps",
    "max_num_checkpoints": "use checkpoint_every_n_steps (0 = at the end of each epoch) and num_checkpoints_to_keep",
    "checkpoint_and_evaluation_frequency": "use checkpoint_every_n_steps (0 = at the end of each epoch)",
    "min_num_update_steps": "the run length is num_epochs over the pairs",
}
# LLMForge spellings of our keys: LLMForge key -> (our key, its value in our terms).
LLMFORGE_RENAMES = {
    "num_warmup_steps": ("warmup_steps", lambda v: v),
    "no_gradient_checkpoint": ("gradient_checkpointing", lambda v: v if v is None else not v),
    "flash_attention_2": ("attn_implementation", lambda v: "flash_attention_2" if v else None),
}
TASK_HINT = ("LLMForge's other tasks (causal_lm, instruction_tuning, classification, vision_language) are "
             "supervised fine-tuning; this stage trains DPO only. For SFT on Ray use TRL's SFTTrainer or "
             "LLaMA-Factory, then give the SFT model as model_id here")


class DeepSpeedConfig(Base):
    """LLMForge's `deepspeed: {config_path: ...}`. Its ZeRO stage is read from the JSON and becomes FSDP sharding;
    DeepSpeed itself is not used (Ray Train's FSDP needs no launcher and no extra dependency)."""

    config_path: str = Field(min_length=1)  # a DeepSpeed JSON; relative paths are from the repo root
    zero_stage: Optional[int] = None  # read from the file (zero_optimization.stage); not set by hand

    @model_validator(mode="after")
    def _read_stage(self):
        p = resolve(self.config_path)
        try:
            ds = json.loads(p.read_text())
            stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
        except FileNotFoundError:
            raise ValueError(f"DeepSpeed config {self.config_path} not found (relative paths are from the repo "
                             f"root); or set deepspeed: null and strategy: fsdp") from None
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"cannot read the ZeRO stage from {self.config_path} ({type(e).__name__}: {e}); "
                             f"it must be JSON with zero_optimization.stage") from None
        if stage not in ZERO_TO_FSDP:
            raise ValueError(f"{self.config_path}: zero_optimization.stage {stage} is not a ZeRO stage (0-3)")
        self.zero_stage = stage
        return self


class DPOStageConfig(StageBase):
    input_dir: str = "${output_dir}/02_judge"  # stage 2's output; or give train_path
    # your own TRL-format pairs (jsonl/parquet): prompt, chosen, rejected; "" is an error, not a fallback
    train_path: Optional[str] = Field(default=None, min_length=1)
    task: Literal["preference_tuning"] = "preference_tuning"
    model_id: str = "models/smollm2-135m-instruct"  # the SFT model: policy init
    reference_model_id: Optional[str] = None  # None = model_id (the usual DPO setup)
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # policy and reference (AVX512-BF16 CPUs, GPUs)
    context_length: int = Field(default=512, gt=0)  # max prompt + response tokens per sequence
    max_prompt_length: int = Field(default=384, gt=0)  # a longer prompt loses the start of its last user message
    truncation: Literal["drop", "truncate_response"] = "drop"  # what to do with pairs that still do not fit
    num_devices: int = Field(default=1, gt=0)  # training workers
    worker_resources: dict[str, float] = {"accelerator_type:A100": 0.001}  # custom resources per worker
    num_cpus_per_worker: float = Field(default=1.0, gt=0)
    cpu_threads_after_reference: Optional[int] = Field(default=None, gt=0)  # CPU: trainer threads once the pool is done
    # one GPU per worker; "auto" (as LLMForge): true when the Ray cluster has GPUs (resolved once Ray is up)
    use_gpu: Union[bool, Literal["auto"]] = "auto"
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp shards the policy for models that do not fit one GPU
    # fsdp only: FULL_SHARD (params, grads, optimizer: ZeRO-3) | SHARD_GRAD_OP (grads, optimizer: ZeRO-2)
    fsdp_sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP"] = "FULL_SHARD"
    deepspeed: Optional[DeepSpeedConfig] = None  # LLMForge key: its ZeRO stage sets strategy + sharding
    # transformers' attn_implementation for policy and reference; None = its default (sdpa). LLMForge's
    # `flash_attention_2: true` sets "flash_attention_2" (needs the flash-attn package and a GPU).
    attn_implementation: Optional[str] = None
    num_epochs: int = Field(default=1, gt=0)
    learning_rate: float = Field(default=5e-6, gt=0)
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    train_batch_size_per_device: int = Field(default=4, gt=0)  # pairs per step per worker
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    disable_dropout: bool = True  # TRL's default: no dropout in the policy (LoRA dropout included)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, one more forward a step
    padding: Literal["longest"] = "longest"  # LLMForge key; we always pad to the longest in the batch
    lora_config: Optional[LoraConfig] = LoraConfig()  # null = full fine-tuning
    preference_tuning_config: PreferenceTuningConfig = PreferenceTuningConfig()
    num_data_blocks_per_device: int = Field(default=8, gt=0)  # finer blocks keep the reference pool fed
    num_checkpoints_to_keep: int = Field(default=1, gt=0)
    checkpoint_every_n_steps: int = Field(default=0, ge=0)  # 0 = at the end of each epoch only
    max_failures: int = Field(default=2, ge=-1)  # worker-group restarts from the last checkpoint
    logging_steps: int = Field(default=1, gt=0)
    seed: int = 0
    # Experiment tracking (common/tracking.py): TRL's `report_to`, a list of tensorboard / mlflow / wandb, or "none",
    # or "all" (every one installed). LLMForge's `logger` block adds its provider to it. Runs go under the stage's
    # output (runs/, mlruns/, wandb/) unless MLFLOW_TRACKING_URI or the logger's provider_config says otherwise.
    report_to: Union[Literal["none", "all"], list[Literal["tensorboard", "mlflow", "wandb"]]] = "none"
    logger: Optional[LoggerConfig] = None

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, v):  # transformers takes a single name too: report_to: tensorboard
        v = [v] if isinstance(v, str) and v not in ("none", "all") else v
        for name in v if isinstance(v, list) else ():
            if name not in ("tensorboard", "mlflow", "wandb"):
                close = difflib.get_close_matches(str(name), ["tensorboard", "mlflow", "wandb"], n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ValueError(f"unknown tracker '{name}' ({hint}report_to takes tensorboard, mlflow, wandb, "
                                 f"or \"none\" / \"all\")")
        return v

    @model_validator(mode="after")
    def _logger_joins_report_to(self):
        if self.logger is not None:
            from common.tracking import check_logger  # the tracker-specific keys live with the trackers

            check_logger(self.logger.provider, self.logger.provider_config)
            if self.report_to == "none":
                self.report_to = []
            if isinstance(self.report_to, list) and self.logger.provider not in self.report_to:
                self.report_to = [*self.report_to, self.logger.provider]
        return self

    @model_validator(mode="before")
    @classmethod
    def _llmforge_keys(cls, data):
        """LLMForge spellings mapped to ours (same meaning), and its keys we cannot honour refused in one line."""
        if not isinstance(data, dict):
            return data
        for key, hint in LLMFORGE_REFUSED.items():
            if key in data:
                raise ValueError(f"'{key}' (LLMForge key) is not supported: {hint}")
        data = dict(data)
        for old, (new, convert) in LLMFORGE_RENAMES.items():
            if old in data:
                value = convert(data.pop(old))
                if new in data and data[new] != value and value is not None:
                    raise ValueError(f"'{old}' (LLMForge key) and '{new}' disagree; keep one of them")
                if value is not None:
                    data.setdefault(new, value)
        if data.get("checkpoint_every_n_epochs") not in (None, 1):
            raise ValueError("'checkpoint_every_n_epochs' (LLMForge key): only 1 (a checkpoint at each epoch's "
                             "end, the default here) is supported; use checkpoint_every_n_steps for more")
        data.pop("checkpoint_every_n_epochs", None)
        if data.get("trainer_resources"):
            raise ValueError("'trainer_resources' (LLMForge key): Ray Train's controller here holds no resources; "
                             "remove it (worker_resources place the training workers)")
        data.pop("trainer_resources", None)
        return data

    @field_validator("task", mode="before")
    @classmethod
    def _task(cls, v):
        if v != "preference_tuning":
            raise ValueError(f"{v!r} is not supported: {TASK_HINT}")
        return v

    @field_validator("padding", mode="before")
    @classmethod
    def _padding(cls, v):
        if v != "longest":
            raise ValueError(f"{v!r} is not supported: batches are padded to their longest row (padding to "
                             f"context_length gives the same loss, padded tokens are masked, at more compute); "
                             f"use padding: longest")
        return v
    # Validation during training: held-out pairs (valid_path, else stage 2's pairing.valid_fraction share) are
    # scored without an update at step 0, every eval_steps optimizer steps and at the end (TRL's eval/* metrics).
    valid_path: Optional[str] = Field(default=None, min_length=1)  # LLMForge key: your own TRL-format pairs
    eval_batch_size_per_device: int = Field(default=4, gt=0)  # LLMForge key: pairs per eval forward per worker
    eval_steps: Optional[int] = Field(default=None, ge=0)  # TRL's name; null or 0 = at step 0 and the end only

    @model_validator(mode="after")
    def _llmforge_compat(self):
        if self.deepspeed is not None:  # DeepSpeed's ZeRO role is played by FSDP here (common.dpo.plan_notes)
            self.strategy, sharding = ZERO_TO_FSDP[self.deepspeed.zero_stage]
            self.fsdp_sharding_strategy = sharding or self.fsdp_sharding_strategy
        if self.max_prompt_length >= self.context_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below context_length "
                             f"({self.context_length}) to leave room for the response")
        ptc = self.preference_tuning_config
        if ptc.label_smoothing and ptc.loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"label_smoothing applies to loss_type sigmoid or robust, not {ptc.loss_type}")
        return self


# ---------------------------------------------------------------- stage 4
class CompareModel(Base):
    name: str = Field(min_length=1)  # its column in the report
    path: Optional[str] = None  # an HF model folder to generate with
    outputs: Optional[str] = None  # or a jsonl of another system's outputs: {"id": ..., "response": ...}

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.outputs is None):
            raise ValueError(f"model '{self.name}': give exactly one of `path` (a model to generate with) or "
                             f"`outputs` (a jsonl of its responses)")
        return self


class EvaluateStageConfig(StageBase):
    dpo_dir: str = "${output_dir}/03_dpo_train"  # the final model is read from this stage's manifest
    judge_dir: Optional[str] = "${output_dir}/02_judge"  # judge, filters, pairing rule: from stage 2's manifest
    # Only with judge_dir: null (no stage-2 run, e.g. DPO on your own pairs): the judge settings to use instead.
    judge: Optional[JudgeConfig] = None  # null = JudgeConfig() (similarity)
    filters: Optional[FilterConfig] = None
    pairing: Optional[PairingConfig] = None
    baseline: CompareModel = CompareModel(name="sft", path="models/smollm2-135m-instruct")
    others: list[CompareModel] = []  # more systems in the same table
    data: DataConfig = DataConfig(path="data/aclsum/test.jsonl", columns={"id": "id", "text": "abstract"})
    prompt: PromptConfig = PromptConfig()
    model: ModelConfig = ModelConfig()  # dtype/max_model_len for every generated model (path is ignored)
    engine: EngineConfig = EngineConfig()
    sampling: SamplingConfig = SamplingConfig(n=1, temperature=0.0)  # greedy, like the Anyscale eval
    bootstrap_samples: int = Field(default=1000, gt=0)  # for the win-rate 95% interval
    num_examples: int = Field(default=3, ge=0)  # side-by-side examples in report.md
    target_win_rate: float = Field(default=0.7, ge=0, le=1)  # the report checks DPO against these two
    max_score_drop: float = Field(default=0.02, ge=0)  # in the judge's score units (mean, DPO vs baseline)
    seed: int = 0

    @field_validator("judge", "filters", "pairing")
    @classmethod
    def _only_without_stage2(cls, v, info):
        if v is not None and info.data.get("judge_dir"):
            raise ValueError(f"`{info.field_name}` comes from stage 2's manifest in judge_dir; set judge_dir: null "
                             f"to give your own")
        return v

    @field_validator("sampling")
    @classmethod
    def _one_response(cls, v):
        if v.n != 1:
            raise ValueError("stage 4 compares one response per prompt and model; set sampling.n: 1")
        return v

    @field_validator("baseline")
    @classmethod
    def _not_dpo(cls, v):
        if v.name == "dpo":
            raise ValueError("`dpo` names the stage-3 model in the report; call the baseline something else")
        return v

    @field_validator("others")
    @classmethod
    def _unique_names(cls, v, info):
        names = ["dpo", info.data["baseline"].name if "baseline" in info.data else "sft"] + [m.name for m in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique in the report (`dpo` is the stage-3 model); "
                             f"{dup} repeats")
        return v


STAGES: dict[str, type[StageBase]] = {
    "01_generate": GenerateConfig,
    "02_judge": JudgeStageConfig,
    "03_dpo_train": DPOStageConfig,
    "04_evaluate": EvaluateStageConfig,
}


# ---------------------------------------------------------------- loading
def _set_dotted(cfg: dict, dotted: str, value: Any, where: str) -> None:
    keys = dotted.split(".")
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise UserError(f"{where}: --set {dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def _interpolate(node: Any, scalars: dict[str, Any]) -> Any:
    if isinstance(node, str):
        def sub(m):
            if m.group(1) not in scalars:
                raise KeyError(m.group(1))
            return str(scalars[m.group(1)])
        return re.sub(r"\$\{(\w+)\}", sub, node)
    if isinstance(node, dict):
        return {k: _interpolate(v, scalars) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, scalars) for v in node]
    return node


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at `loc` (to suggest the closest one for a typo)."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
        else:
            return []
    return list(model.model_fields) + (list(LLMFORGE_RENAMES) if model is DPOStageConfig else [])


def _explain(err: ValidationError, schema: type[BaseModel], where: str) -> str:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    key = ".".join(str(p) for p in loc)
    if e["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _valid_keys(schema, loc), n=1)
        hint = f"did you mean '{'.'.join(map(str, loc[:-1] + (close[0],)))}'?" if close else \
            f"valid keys here: {', '.join(_valid_keys(schema, loc))}"
        return f"{where}: unknown key '{key}' ({hint})"
    if not loc:  # a whole-config check (e.g. an LLMForge key refused): its message names the key
        return f"{where}: {e['msg'].removeprefix('Value error, ')}"
    got = e.get("input")
    got = f" (got {json.dumps(got, default=str)[:60]})" if not isinstance(got, dict) else ""
    msg = e["msg"].removeprefix("Value error, ")
    return f"{where}: '{key}': {msg}{got}"


def load_config(stage: str, path: str, overrides: list[str] = ()) -> StageBase:
    """Read `path` (YAML) for `stage`, apply `key.sub=value` overrides, validate. Raises UserError."""
    schema = STAGES[stage]
    raw = _read_yaml(path, stage)
    for item in overrides:
        shown = item.replace("\n", "\\n")  # a value with a newline stays on the one error line
        if "=" not in item:
            raise UserError(f"--set {shown}: expected key.sub=value (e.g. --set preference_tuning_config.beta=0.05)")
        k, v = item.split("=", 1)
        if not v.strip():  # `--set train_path=` would silently mean "" (often: fall back to a default)
            raise UserError(f"--set {shown}: no value for '{k.strip()}'; give one, or --set {k.strip()}=null to unset "
                            f"it, or --set '{k.strip()}=\"\"' for an empty string")
        try:
            value = yaml.safe_load(v)
        except yaml.YAMLError:
            raise UserError(f"--set {shown}: the value is not valid YAML; quote it, e.g. --set '{k}=\"...\"'") from None
        _set_dotted(raw, k.strip(), value, path)
    scalars = {k: v for k, v in raw.items() if isinstance(v, (str, int, float))}
    scalars.setdefault("output_dir", schema.model_fields["output_dir"].default)
    try:
        raw = _interpolate(raw, scalars)
    except KeyError as e:
        raise UserError(f"{path}: ${{{e.args[0]}}} refers to no top-level key; define it or spell it out") from None
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise UserError(_explain(e, schema, path)) from None


def _read_yaml(path: str, stage: str) -> dict:
    """The config file's top-level mapping, or a UserError naming the file (missing, a folder, not UTF-8, bad YAML)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"config {path} is a folder, not a file; give a YAML file in it, e.g. --config "
                        f"{p / (stage + '.yaml')}")
    if not p.is_file():
        raise UserError(f"config file {path} not found (the configs live in configs/quickstart/ and configs/gpu/)")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: byte 0x{data[e.start]:02x} is not UTF-8; save the file as UTF-8") \
            from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{at} is not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def config_hash(cfg: BaseModel, *exclude: str) -> str:
    """A stable fingerprint of what a stage computes (ray/output settings excluded)."""
    d = cfg.model_dump(mode="json", exclude={"ray", *exclude})
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def resolve(path: str) -> Path:
    """Config paths are relative to the repo root, so scripts work from any working directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO / p


def require_model(path: str, where: str) -> str:
    """A local HF model folder, or a hub id where the hub is reachable (a GPU cluster). Raises UserError."""
    p = resolve(path)
    if (p / "config.json").is_file():
        from common.model_check import check_model_files

        check_model_files(p, where)  # a broken config.json or no weights: here, not deep in vLLM or a worker
        return str(p)
    if p.exists():
        raise UserError(f"{where}: {path} has no config.json, so it is not an HF model folder")
    if os.environ.get("HF_HUB_OFFLINE") == "0" and re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        return path  # a hub id, downloaded by each worker on a cluster with network
    hint = "run `bash scripts/setup.sh` to prepare the embedded models" if "models/" in path else \
        "give a local HF model folder"
    raise UserError(f"{where}: model {path} not found: {hint}")
