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
    return {"prompt_ids": col("prompt_ids"), "chosen_ids": col("chosen_ids"), "rejected_ids": col("rejected_ids"),
            S.PAIR_ID: np.asarray([f"p{i}" for i in range(len(pairs))], dtype=object)}  # as stage 3's batches carry


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


def _pairs_file(path, n: int = 48):
    rows = [json.loads(line) for line in open(REPO / "data/aclsum/test.jsonl")][:n]
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({S.PAIR_ID: r["id"],
                                S.PROMPT: [{"role": "user", "content": "Summarize.\n\n" + r["abstract"]}],
                                S.CHOSEN: [{"role": "assistant", "content": r["summary"].split(". ")[0]}],
                                S.REJECTED: [{"role": "assistant", "content": r["summary"]}]}) + "\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_tokenised_pairs_reach_the_reference_pool_in_many_blocks(ray_local, model_path, tmp_path, suffix):
    """The pool's input keeps num_devices x num_data_blocks_per_device blocks. Tokenising bundled small blocks into
    one once, and the trainer's first batch then waited for the reference pass over the whole epoch. Read from the
    file by Ray Data (never a list on the driver), shuffled with the seed: the same order on every run."""
    import pandas as pd

    from common.config import DPOStageConfig
    from common.dpo import tokenize_pairs
    from common.pairs import scan_pairs, shuffle_key

    path = _pairs_file(tmp_path / "pairs.jsonl")
    if suffix == ".parquet":
        pd.read_json(path, lines=True).to_parquet(path := tmp_path / "pairs.parquet")
    pairs = scan_pairs(path, "train_path", "test", "nothing")
    cfg = DPOStageConfig(num_data_blocks_per_device=6)
    kept, drops = tokenize_pairs(pairs, cfg, model_path, "test")
    assert not drops and kept.count() == 48
    assert kept.num_blocks() == 6  # 8 pairs a block: the seeded shuffle spreads them over all 6
    order = [r[S.PAIR_ID] for r in kept.select_columns([S.PAIR_ID]).iter_rows()]
    again = tokenize_pairs(pairs, cfg, model_path, "test")[0]
    assert [r[S.PAIR_ID] for r in again.select_columns([S.PAIR_ID]).iter_rows()] == order  # deterministic
    file_order = [json.loads(line)[S.PAIR_ID] for line in open(tmp_path / "pairs.jsonl")]
    assert sorted(order) == sorted(file_order) and order != file_order  # shuffled
    # by the pairs and the seed alone: however the files are laid out, the order is that of the seeded id hash
    assert order == sorted(file_order, key=lambda pid: shuffle_key(cfg.seed, pid))
    other = tokenize_pairs(pairs, cfg.model_copy(update={"seed": cfg.seed + 1}), model_path, "test")[0]
    assert [r[S.PAIR_ID] for r in other.select_columns([S.PAIR_ID]).iter_rows()] != order


# ------------------------------------------------- the store that lets a restart skip the reference (no Ray)
def _scored(ids, base=0.0):
    import pandas as pd

    return pd.DataFrame({S.PAIR_ID: ids, S.REF_CHOSEN_LOGPS: [base - i for i in range(len(ids))],
                         S.REF_REJECTED_LOGPS: [base - 10 - i for i in range(len(ids))],
                         S.REF_CHOSEN_TOKENS: [5] * len(ids), S.REF_REJECTED_TOKENS: [7] * len(ids)})


def test_store_parts_are_atomic_first_copy_wins_and_compact_to_one(tmp_path):
    from common.reference import ReferenceStore

    first, second = ReferenceStore(tmp_path / "s", "aaa"), ReferenceStore(tmp_path / "s", "bbb")
    assert first.read().empty and first.compact() is None
    first.write(_scored(["p0", "p1"]))
    first.write(_scored(["p2"]))
    second.write(_scored(["p1", "p3"], base=-100.0))  # p1 again: a batch retried after its actor died
    assert not list((tmp_path / "s").glob(".*"))  # no temporary file left behind
    assert first.rows_written("aaa") == 3 and first.rows_written("bbb") == 2
    df = first.read()
    assert sorted(df[S.PAIR_ID]) == ["p0", "p1", "p2", "p3"]
    assert df.set_index(S.PAIR_ID).loc["p1", S.REF_CHOSEN_LOGPS] in (-1.0, -100.0)
    one = first.compact()
    assert first.parts() == [one] and first.read().equals(df)
    assert first.rows_written("aaa") == 0  # compacted: counted when they were written, not again


def test_stored_pairs_are_read_back_and_only_the_others_go_to_the_pool(tmp_path, batch):
    from common.reference import STORE_COLUMNS, ReferenceStore, _from_store, _not_in_store

    b = {**{k: v.copy() for k, v in batch.items()}, S.PAIR_ID: np.array(["a", "b", "c"], dtype=object)}
    store = ReferenceStore(tmp_path / "s", "x")
    store.write(_scored(["c", "a"]))
    path = str(store.compact())
    known, todo = _from_store({k: v.copy() for k, v in b.items()}, path), _not_in_store(b, path)
    assert list(known[S.PAIR_ID]) == ["a", "c"] and list(todo[S.PAIR_ID]) == ["b"]
    assert list(known[S.REF_CHOSEN_LOGPS]) == [-1.0, 0.0] and list(known[S.REF_PID]) == [-1, -1]
    assert set(STORE_COLUMNS) <= set(known) and len(known[S.PROMPT_IDS]) == 2


def test_an_actor_stores_what_it_scores_and_a_restarted_one_scores_nothing_again(tmp_path, batch, model_path):
    """A Ray Train restart starts new reference actors on the same data: they find the pairs in the store."""
    from common.reference import ReferenceLogProbProcessor, ReferenceStore

    b = {**batch, S.PAIR_ID: np.array(["a", "b", "c"], dtype=object)}
    store = ReferenceStore(tmp_path / "s")
    first = ReferenceLogProbProcessor(model_path, store_dir=str(store.folder), store_tag="one")(
        {k: v.copy() for k, v in b.items()})
    assert store.rows_written("one") == 3
    again = ReferenceLogProbProcessor(model_path, store_dir=str(store.folder), store_tag="two")(
        {k: v.copy() for k, v in b.items()})
    assert store.rows_written("two") == 0
    for col in (S.REF_CHOSEN_LOGPS, S.REF_REJECTED_LOGPS, S.REF_CHOSEN_TOKENS, S.REF_REJECTED_TOKENS):
        assert list(again[col]) == list(first[col]), col
