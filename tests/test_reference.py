"""The two reference backends score the same token ids: transformers (forward pass) and vLLM (`prompt_logprobs`).
Their agreement is measured here on real ACLSum pairs with the embedded model, in float32, no Ray involved."""
import json

import numpy as np
import pytest

from common import schema as S
from common.reference import ReferenceLogProbProcessor, VLLMReferenceLogProbProcessor
from common.tokenize import load_tokenizer, tokenize_pair
from conftest import REPO


@pytest.fixture(scope="module")
def batch(model_path):
    tok = load_tokenizer(model_path)
    rows = [json.loads(line) for line in open(REPO / "data/aclsum/test.jsonl")][:3]
    pairs = [tokenize_pair(tok, [{"role": "user", "content": "Summarize.\n\n" + r["abstract"]}],
                           r["summary"].split(". ")[0], r["summary"], 1024, 768) for r in rows]
    col = lambda k: np.array([np.asarray(p[k]) for p in pairs] + [None], dtype=object)[:-1]  # noqa: E731
    return {"prompt_ids": col("prompt_ids"), "chosen_ids": col("chosen_ids"), "rejected_ids": col("rejected_ids")}


@pytest.mark.slow
def test_vllm_backend_agrees_with_transformers(batch, model_path):
    hf = ReferenceLogProbProcessor(model_path, dtype="float32")({k: v.copy() for k, v in batch.items()})
    vl = VLLMReferenceLogProbProcessor(model_path, dtype="float32", max_model_len=1024)(
        {k: v.copy() for k, v in batch.items()})
    for col in (S.REF_CHOSEN_LOGPS, S.REF_REJECTED_LOGPS):
        assert np.all(hf[col] < 0) and np.all(np.isfinite(vl[col]))
        diff = np.abs(hf[col] - vl[col])
        # Summed over 20-90 response tokens: float32 kernels differ in the last digits, nothing more.
        assert diff.max() < 0.05, (col, hf[col], vl[col])
    assert list(hf["chosen_num_tokens"]) == list(vl["chosen_num_tokens"])


def test_model_logps_scores_the_same_as_a_full_batched_forward(batch, model_path):
    """`model_logps` (used by the trainer and the reference actor) runs each sequence alone, unpadded, with the LM head
    on its response window only (`logits_to_keep`). Prompts of different lengths, right padding: its log-probs,
    counts and response-position logit sums must equal those of one full forward of the padded batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from common.dpo_loss import model_logps, sequence_logps, supports_logits_to_keep
    from common.tokenize import collate_pairs

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    assert supports_logits_to_keep(model)
    ids, attn, mask = collate_pairs(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], 2)
    assert len({len(p) for p in batch["prompt_ids"]}) > 1
    with torch.inference_mode():
        logits = model(ids, attention_mask=attn).logits
        full, n_full = sequence_logps(logits, ids, mask)
        # the logit at t scores token t + 1: sum the vocabulary-mean logit over those positions
        sums_full = (logits[:, :-1].mean(-1) * mask[:, 1:]).sum(1)
        cut, n_cut, sums_cut = model_logps(model, ids, attn, mask)
        off, n_off, sums_off = model_logps(model, ids, attn, mask, window=False)
    assert torch.equal(n_cut, n_full) and torch.equal(n_off, n_full)
    for logps, sums in ((cut, sums_cut), (off, sums_off)):  # float32 kernels of other shapes: last digits only
        torch.testing.assert_close(logps, full, rtol=0, atol=1e-3)
        torch.testing.assert_close(sums, sums_full, rtol=1e-4, atol=1e-3)
    assert cut.dtype == sums_cut.dtype == torch.float32 and n_cut.dtype == torch.int64


@pytest.mark.slow
def test_tokenised_pairs_reach_the_reference_pool_in_many_blocks(ray_local, model_path):
    """The pool's input keeps num_devices x num_data_blocks_per_device blocks. Tokenising bundled small blocks into
    one once, and the trainer's first batch then waited for the reference pass over the whole epoch."""
    from common.config import DPOStageConfig
    from common.dpo import tokenize_pairs

    rows = [json.loads(line) for line in open(REPO / "data/aclsum/test.jsonl")][:12]
    pairs = [{S.PAIR_ID: r["id"], S.PROMPT: [{"role": "user", "content": "Summarize.\n\n" + r["abstract"]}],
              S.CHOSEN: [{"role": "assistant", "content": r["summary"].split(". ")[0]}],
              S.REJECTED: [{"role": "assistant", "content": r["summary"]}]} for r in rows]
    kept, drops = tokenize_pairs(pairs, DPOStageConfig(num_data_blocks_per_device=6), model_path, "test")
    assert not drops and kept.count() == 12
    assert kept.num_blocks() == 6
