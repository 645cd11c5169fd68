"""Step 0 is exact: the reference log-probs the trainer receives equal the policy's own before its first update.

The policy starts as the reference model (LoRA with B = 0), so any difference at step 0 is numerical. In bf16 a
padded batch made a sequence's summed log-prob depend on its batch (padding width, batch shape), and the
quickstart's reference `batch_size` (4) differs from its `train_batch_size_per_device` (2). `model_logps` now runs
each sequence alone and unpadded; this checks it on real tokenised ACLSum pairs with the real model in bf16, the
reference actor called directly (no Ray) and the policy built and run the way the trainer runs it: train mode,
LoRA, gradients on, and one or two torch threads (the trainer takes more threads after the reference pass).
"""
import json
import math

import numpy as np
import pytest
import torch

from common import schema as S
from common.config import load_config
from common.dpo_loss import dpo_loss, model_logps, supports_logits_to_keep
from common.reference import ReferenceLogProbProcessor
from common.tokenize import collate_pairs, load_tokenizer, tokenize_pair
from common.train_loop import build_model
from conftest import REPO

CONFIG = REPO / "configs/quickstart/03_dpo_train.yaml"
NUM_PAIRS = 4


def _column(values):
    out = np.empty(len(values), dtype=object)
    out[:] = [np.asarray(v, dtype=np.int64) for v in values]
    return out


@pytest.fixture(scope="module")
def pairs(model_path):
    """Stage 3's test pairs (tests/test_dpo_stage.py): the first sentence of a summary beats the whole summary."""
    tok = load_tokenizer(model_path)
    rows = [json.loads(line) for line in open(REPO / "data/aclsum/test.jsonl")][:NUM_PAIRS]
    out = []
    for r in rows:
        prompt = [{"role": "user", "content": "Summarize in one sentence.\n\n" + r["summary"]}]
        out.append(tokenize_pair(tok, prompt, r["summary"].split(". ")[0].rstrip(".") + ".", r["summary"], 512, 384))
    assert len({len(p[S.PROMPT_IDS]) for p in out}) > 1  # different widths: padding would differ per batch
    return out


@pytest.fixture(scope="module")
def reference_logps(pairs, model_path):
    """{reference batch_size: [2N] log-probs (chosen of every pair, then rejected)}, from the actor's own class."""
    torch.set_num_threads(1)  # as in the actor: Ray gives it a fraction of one core
    actor = ReferenceLogProbProcessor(model_path, dtype="bfloat16")
    out = {}
    for bs in (1, 3, 4):
        chosen, rejected = [], []
        for start in range(0, NUM_PAIRS, bs):
            chunk = pairs[start:start + bs]
            batch = {k: _column([p[k] for p in chunk]) for k in (S.PROMPT_IDS, S.CHOSEN_IDS, S.REJECTED_IDS)}
            batch[S.PAIR_ID] = np.asarray([f"p{start + i}" for i in range(len(chunk))], dtype=object)  # as stage 3's
            res = actor(batch)
            chosen += res[S.REF_CHOSEN_LOGPS].tolist()
            rejected += res[S.REF_REJECTED_LOGPS].tolist()
        out[bs] = torch.tensor(chosen + rejected)
    return out


@pytest.fixture(scope="module")
def policy(model_path):
    cfg = load_config("03_dpo_train", str(CONFIG), ["train_path=x", f"model_id={model_path}"])
    assert cfg.dtype == "bfloat16" and cfg.lora_config is not None
    model = build_model(cfg, torch.bfloat16)
    assert model.training
    return model


# Two threads only once: on 2 shared cores they are the slow case (the trainer switches to them after step 0).
@pytest.mark.parametrize("train_bs, threads", [(1, 1), (2, 1), (2, 2)])
def test_policy_at_step0_reproduces_the_reference_for_any_batch_sizes(policy, pairs, reference_logps, train_bs,
                                                                      threads):
    window = supports_logits_to_keep(policy.get_base_model())
    torch.set_num_threads(threads)
    try:
        chosen, rejected, losses = [], [], []
        for start in range(0, NUM_PAIRS, train_bs):
            chunk = pairs[start:start + train_bs]
            b = len(chunk)
            ids, attn, mask = collate_pairs(*([p[k] for p in chunk] for k in (S.PROMPT_IDS, S.CHOSEN_IDS,
                                                                                 S.REJECTED_IDS)), pad_id=0)
            logps, ntok, logit_sums = model_logps(policy, ids, attn, mask, window)  # gradients on, as in training
            assert logps.requires_grad and not logit_sums.requires_grad
            ref = reference_logps[4]
            ref_c = ref[start:start + b]
            ref_r = ref[NUM_PAIRS + start:NUM_PAIRS + start + b]
            loss = dpo_loss(logps[:b], logps[b:], ref_c, ref_r, beta=0.1)[0].mean()
            loss.backward()  # one backward through the per-sequence graphs
            losses.append(loss.item())
            chosen += logps[:b].tolist()
            rejected += logps[b:].tolist()
        policy.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(1)
    mine = torch.tensor(chosen + rejected)
    for ref_bs, ref in reference_logps.items():
        diff = (mine - ref).abs().max().item()
        assert diff <= 1e-3, (ref_bs, train_bs, threads, diff, mine, ref)
    assert all(math.isclose(x, math.log(2), abs_tol=1e-3) for x in losses), losses


def test_reference_batch_size_does_not_change_a_log_prob(reference_logps):
    assert torch.equal(reference_logps[1], reference_logps[3]) and torch.equal(reference_logps[1], reference_logps[4])


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64)).train()


def _tiny_batch(rank: int):
    g = torch.Generator().manual_seed(rank)
    ids = lambda n: torch.randint(1, 64, (n,), generator=g).tolist()  # noqa: E731
    return collate_pairs([ids(3), ids(5)], [ids(4), ids(2)], [ids(6), ids(1)], pad_id=0)


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = _tiny_llama()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    for _ in range(2):  # two steps: the reducer must be ready for the next forward after each backward
        model.zero_grad(set_to_none=True)
        logps, _, _ = model_logps(ddp, *_tiny_batch(rank))  # 4 forwards, then one backward
        logps.sum().backward()
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], out)
    dist.barrier()  # neither rank tears gloo down while the other still uses it (seen: SIGABRT in ~1 run of 15)
    dist.destroy_process_group()


def test_per_sequence_forwards_then_one_backward_under_ddp(tmp_path):
    """DDP sees one forward per sequence and then a single backward: every gradient hook fires once, and the
    averaged gradients equal the single-process gradient of the mean of the ranks' losses."""
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "grads.pt")), nprocs=world)
    ddp_grads = torch.load(tmp_path / "grads.pt")

    model = _tiny_llama()
    sum(model_logps(model, *_tiny_batch(rank))[0].sum() for rank in range(world)).div(world).backward()
    assert len(ddp_grads) == len(list(model.parameters()))
    for got, p in zip(ddp_grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
