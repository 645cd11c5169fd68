"""Tests for common/dpo_loss.py: hand-worked values, then the same math cross-checked against TRL 1.16.

Hand-worked example used below (beta = 0.1):

    policy_chosen = -10, ref_chosen = -11   ->  chosen log-ratio   c = +1,  chosen reward   = 0.1 * 1  = +0.1
    policy_rejected = -12, ref_rejected = -11 -> rejected log-ratio r = -1, rejected reward = 0.1 * -1 = -0.1
    d = c - r = 2,  z = beta * d = 0.2,  softplus(x) = log(1 + e^x) = -logsigmoid(-x)

    sigmoid          -logsigmoid(0.2) = softplus(-0.2) = log(1 + e^-0.2)            = 0.598138869
    sigmoid, ls=0.1  0.9 * softplus(-0.2) + 0.1 * softplus(0.2)
                     = softplus(-0.2) + 0.1 * 0.2   (since softplus(z) = z + softplus(-z))   = 0.618138869
    robust,  ls=0.1  (0.9 * softplus(-0.2) - 0.1 * softplus(0.2)) / 0.8
                     = softplus(-0.2) - 0.1 * 0.2 / 0.8                                = 0.573138869
    hinge            relu(1 - 0.2)                                                     = 0.8
    ipo (chosen 2 tokens, rejected 4 tokens)
                     (1/2 - (-1/4) - 1/(2 * 0.1))^2 = (0.75 - 5)^2                    = 18.0625

When policy == reference every log-ratio is 0, so z = 0 and
    sigmoid = softplus(0) = ln 2 (for any ls: (1 - ls) ln 2 + ls ln 2),  robust = (1 - 2 ls) ln 2 / (1 - 2 ls) = ln 2,
    hinge = 1,  ipo = (1 / (2 beta))^2.
"""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

import trl  # noqa: F401  (a declared test dependency: the cross-checks below must run, never skip)

from common.dpo_loss import LOSS_TYPES, dpo_loss, dpo_metrics, model_logps, sequence_logps

LN2 = math.log(2)
SOFTPLUS_M02 = math.log1p(math.exp(-0.2))  # 0.598138869...


def _t(*values):
    return torch.tensor(values, dtype=torch.float32)


def _hand_example():
    """The docstring's pair: (policy_chosen, policy_rejected, ref_chosen, ref_rejected)."""
    return _t(-10.0), _t(-12.0), _t(-11.0), _t(-11.0)


# --------------------------------------------------------------------------- hand-worked values
@pytest.mark.parametrize(
    "loss_type, label_smoothing, expected",
    [
        ("sigmoid", 0.0, LN2),
        ("sigmoid", 0.1, LN2),
        ("robust", 0.0, LN2),
        ("robust", 0.2, LN2),
        ("hinge", 0.0, 1.0),
        ("ipo", 0.0, 25.0),  # (1 / (2 * 0.1))^2
    ],
)
def test_policy_equal_to_reference(loss_type, label_smoothing, expected):
    logps = _t(-3.0, -40.0, -7.5)
    n = torch.tensor([2, 9, 5])
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        logps, logps.flip(0), logps, logps.flip(0), beta=0.1, loss_type=loss_type,
        label_smoothing=label_smoothing, chosen_num_tokens=n, rejected_num_tokens=n.flip(0),
    )
    assert_close(losses, torch.full((3,), expected))
    assert_close(chosen_rewards, torch.zeros(3))
    assert_close(rejected_rewards, torch.zeros(3))


@pytest.mark.parametrize(
    "loss_type, label_smoothing, expected",
    [
        ("sigmoid", 0.0, SOFTPLUS_M02),
        ("sigmoid", 0.1, SOFTPLUS_M02 + 0.1 * 0.2),
        ("robust", 0.1, SOFTPLUS_M02 - 0.1 * 0.2 / 0.8),
        ("hinge", 0.0, 0.8),
        ("ipo", 0.0, 18.0625),
    ],
)
def test_hand_worked_example(loss_type, label_smoothing, expected):
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        *_hand_example(), beta=0.1, loss_type=loss_type, label_smoothing=label_smoothing,
        chosen_num_tokens=torch.tensor([2]), rejected_num_tokens=torch.tensor([4]),
    )
    assert_close(losses, _t(expected))
    assert_close(chosen_rewards, _t(0.1))
    assert_close(rejected_rewards, _t(-0.1))


def test_hand_worked_numbers_in_docstring():
    # The decimals quoted in the module docstring, so a typo there cannot survive.
    assert SOFTPLUS_M02 == pytest.approx(0.598138869)
    assert SOFTPLUS_M02 + 0.02 == pytest.approx(0.618138869)
    assert SOFTPLUS_M02 - 0.025 == pytest.approx(0.573138869)


def test_sigmoid_gradient_and_detached_rewards():
    """At policy == reference, d/d(policy_chosen) of softplus(-beta * d) is -beta * sigmoid(0) = -beta / 2."""
    policy_chosen = _t(-5.0).requires_grad_()
    policy_rejected = _t(-6.0).requires_grad_()
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, _t(-5.0), _t(-6.0), beta=0.1
    )
    losses.sum().backward()
    assert_close(policy_chosen.grad, _t(-0.05))  # raise the chosen log-prob
    assert_close(policy_rejected.grad, _t(0.05))  # lower the rejected one
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_ipo_tokens_clamped_to_one():
    # An empty (fully truncated) response counts as 1 token, as in TRL, instead of dividing by zero.
    losses, _, _ = dpo_loss(
        *_hand_example(), beta=0.1, loss_type="ipo",
        chosen_num_tokens=torch.tensor([0]), rejected_num_tokens=torch.tensor([1]),
    )
    assert_close(losses, _t((1 + 1 - 5) ** 2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_type": "kto"}, "Unknown DPO loss_type 'kto'"),
        ({"beta": 0.0}, "beta must be > 0"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "no effect on loss_type='hinge'"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "no effect on loss_type='ipo'"),
        ({"loss_type": "ipo"}, "needs chosen_num_tokens and rejected_num_tokens"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    kwargs = {"beta": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        dpo_loss(*_hand_example(), **kwargs)


# --------------------------------------------------------------------------- sequence_logps
def _naive_sequence_logps(logits, labels, loss_mask):
    """The textbook version: full log_softmax, gather, mask, sum."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = labels[:, 1:].masked_fill(loss_mask[:, 1:] == 0, 0)
    per_token = logps.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    mask = loss_mask[:, 1:].float()
    return (per_token * mask).sum(1), loss_mask[:, 1:].sum(1)


def _prompt_response_padding_batch(batch=3, seq_len=9, vocab=11, seed=0):
    """Rows laid out as [prompt | response | padding], like TRL's DataCollatorForPreference (right padding)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq_len, vocab, generator=g) * 3
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    loss_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    for i, (prompt, response) in enumerate([(2, 4), (4, 5), (1, 3)][:batch]):
        loss_mask[i, prompt : prompt + response] = True
    return logits, input_ids, loss_mask


def test_sequence_logps_uniform_logits_by_hand():
    """All-zero logits over V = 4 give every token log(1/4): a 3-token response sums to -3 ln 4."""
    logits = torch.zeros(1, 5, 4)
    labels = torch.tensor([[1, 2, 3, 0, 0]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 1]])  # 2 prompt tokens, 3 response tokens
    summed, num_tokens = sequence_logps(logits, labels, loss_mask)
    assert_close(summed, _t(-3 * math.log(4)))
    assert num_tokens.tolist() == [3]


def test_sequence_logps_matches_naive_with_prompt_and_padding():
    logits, input_ids, loss_mask = _prompt_response_padding_batch()
    # The HF convention puts -100 outside the response; that must not reach gather.
    labels = input_ids.masked_fill(~loss_mask, -100)
    summed, num_tokens = sequence_logps(logits, labels, loss_mask)
    expected, expected_tokens = _naive_sequence_logps(logits, input_ids, loss_mask)
    assert_close(summed, expected)
    assert num_tokens.tolist() == expected_tokens.tolist() == [4, 5, 3]
    assert summed.dtype == torch.float32 and num_tokens.dtype == torch.int64

    # Padding and prompt logits must not matter: scramble them and the result is unchanged.
    scrambled = logits.clone()
    predicts_response = loss_mask[:, 1:]  # logits at t score the token at t + 1
    scrambled[:, :-1][~predicts_response] = 1e4 * torch.randn_like(scrambled[:, :-1][~predicts_response])
    scrambled[:, -1] = -1e4
    assert_close(sequence_logps(scrambled, labels, loss_mask)[0], summed)


def test_sequence_logps_gradient_matches_naive():
    logits, input_ids, loss_mask = _prompt_response_padding_batch(seed=1)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    sequence_logps(a, input_ids, loss_mask.long())[0].sum().backward()  # 0/1 mask works like bool
    _naive_sequence_logps(b, input_ids, loss_mask)[0].sum().backward()
    assert_close(a.grad, b.grad)


def test_sequence_logps_bfloat16_is_computed_in_float32():
    logits, input_ids, loss_mask = _prompt_response_padding_batch(seed=2)
    logits = logits.bfloat16()
    summed, _ = sequence_logps(logits, input_ids, loss_mask)
    assert summed.dtype == torch.float32
    # Same bfloat16 values, reduced in float32: equal to float32 rounding, not bfloat16 rounding.
    assert_close(summed, _naive_sequence_logps(logits.float(), input_ids, loss_mask)[0])


# --------------------------------------------------------------------------- dpo_metrics
def test_dpo_metrics_by_hand():
    """Rewards chosen [0.3, -0.1, 0.2, 0.0] vs rejected [0.1, 0.1, -0.2, 0.0]:
    margins [0.2, -0.2, 0.4, 0.0] -> mean 0.1; chosen > rejected for pairs 1 and 3 only (the tie counts as
    wrong) -> accuracy 2/4 = 0.5."""
    chosen_rewards = _t(0.3, -0.1, 0.2, 0.0)
    rejected_rewards = _t(0.1, 0.1, -0.2, 0.0)
    metrics = dpo_metrics(
        loss=_t(0.5, 0.7, 0.3, 0.9),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        policy_chosen_logps=_t(-10.0, -20.0, -30.0, -40.0),
        policy_rejected_logps=_t(-12.0, -22.0, -32.0, -42.0),
    )
    assert set(metrics) == {
        "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "logps/rejected",
    }
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["rewards/accuracies"] == 0.5
    assert metrics["rewards/margins"] == pytest.approx(0.1)
    assert metrics["rewards/chosen"] == pytest.approx(0.1)
    assert metrics["rewards/rejected"] == pytest.approx(0.0)
    assert metrics["loss"] == pytest.approx(0.6)
    assert metrics["logps/chosen"] == pytest.approx(-25.0)
    assert metrics["logps/rejected"] == pytest.approx(-27.0)


def test_dpo_metrics_logits_when_given():
    r = _t(1.0)
    metrics = dpo_metrics(r, r, r, r, r, chosen_logits_mean=_t(1.0, 2.0), rejected_logits_mean=-0.5)
    assert metrics["logits/chosen"] == pytest.approx(1.5)
    assert metrics["logits/rejected"] == -0.5


# --------------------------------------------------------------------------- cross-check against TRL 1.16
class _SingleProcess:
    """The three things DPOTrainer._compute_loss asks of its `accelerate.Accelerator` on one CPU process."""

    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _trl_compute_loss(model, inputs, loss_type, beta, label_smoothing, ref_model=None):
    """Run TRL's own `DPOTrainer._compute_loss` unbound, with `self` carrying the fields `__init__` would set.

    Building a real DPOTrainer needs a dataset, a tokenizer and an output dir; the loss only reads these fields
    (see DPOTrainer.__init__, "Training arguments" and "Initialize the metrics"), so we set them directly. TRL's math
    runs unmodified. Returns (mean loss, {metric name: value}).
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    trainer = SimpleNamespace(
        model=model,
        ref_model=ref_model,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        accelerator=_SingleProcess(),
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        label_smoothing=label_smoothing,
        precompute_ref_logps=ref_model is None,  # then the reference log-probs come in `inputs`
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        use_weighting=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
    )
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


class _FixedLogProbs:
    """Stands in for a model patched by TRL's `add_fused_lm_head`: returns given per-token log-probs, so the
    cross-check can use random log-probs of any size (a tiny random model only gives losses near ln 2)."""

    training = False

    def __init__(self, per_token_logps):
        self.per_token_logps = per_token_logps

    def __call__(self, **kwargs):
        from trl.trainer.utils import FusedCausalLMOutput

        zeros = torch.zeros_like(self.per_token_logps)
        return FusedCausalLMOutput(
            log_probs=self.per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def _random_pairs(num_pairs=6, seq_len=12, seed=0):
    """Random per-token log-probs in TRL's batch layout ([chosen; rejected] rows, prompt | response | padding),
    and reference sums far enough from the policy's that beta * d spans every regime (hinge on both sides of 1)."""
    g = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * num_pairs, seq_len, dtype=torch.long)
    for row in range(2 * num_pairs):
        prompt = int(torch.randint(1, 4, (1,), generator=g))
        response = int(torch.randint(1, seq_len - prompt + 1, (1,), generator=g))
        completion_mask[row, prompt : prompt + response] = 1
    # TRL's fused head returns [rows, seq_len - 1] log-probs, zero where the (shifted) label is -100.
    per_token = -4 * torch.rand(2 * num_pairs, seq_len - 1, generator=g) * completion_mask[:, 1:]
    ref = per_token.sum(1) + 15 * torch.randn(2 * num_pairs, generator=g)
    return per_token, completion_mask, ref


# (our loss_type, label_smoothing, the TRL 1.16 loss_type with the same formula)
CROSS_CHECKS = [
    ("sigmoid", 0.0, "sigmoid"),
    # TRL 1.16's `sigmoid` ignores label_smoothing; its cDPO formula lives on in `aot`, which sorts the batch's
    # log-ratios before applying it. On one pair the sort is a no-op, so `aot` is exactly cDPO there.
    ("sigmoid", 0.1, "aot"),
    ("ipo", 0.0, "ipo"),
    ("hinge", 0.0, "hinge"),
    ("robust", 0.0, "robust"),
    ("robust", 0.2, "robust"),
]


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type, label_smoothing, trl_loss_type", CROSS_CHECKS)
def test_loss_matches_trl_per_pair(loss_type, label_smoothing, trl_loss_type, beta):
    per_token, completion_mask, ref = _random_pairs()
    num_pairs = len(ref) // 2
    policy = per_token.sum(1)
    num_tokens = completion_mask.sum(1)  # TRL's IPO length; sequence_logps's count equals it (prompt >= 1 token)
    losses, _, _ = dpo_loss(
        policy[:num_pairs], policy[num_pairs:], ref[:num_pairs], ref[num_pairs:], beta=beta,
        loss_type=loss_type, label_smoothing=label_smoothing,
        chosen_num_tokens=num_tokens[:num_pairs], rejected_num_tokens=num_tokens[num_pairs:],
    )
    assert (beta * (policy[:num_pairs] - ref[:num_pairs] - policy[num_pairs:] + ref[num_pairs:])).abs().max() > 1

    trl_losses = []
    for i in range(num_pairs):  # one pair per call: TRL returns the batch mean, we compare every example
        rows = [i, num_pairs + i]
        inputs = {
            "input_ids": torch.zeros(2, completion_mask.size(1), dtype=torch.long),  # unused by the stub model
            "attention_mask": torch.ones(2, completion_mask.size(1), dtype=torch.long),
            "completion_mask": completion_mask[rows],
            "ref_chosen_logps": ref[i : i + 1],
            "ref_rejected_logps": ref[num_pairs + i : num_pairs + i + 1],
        }
        loss, _ = _trl_compute_loss(_FixedLogProbs(per_token[rows]), inputs, trl_loss_type, beta, label_smoothing)
        trl_losses.append(loss)
    assert_close(losses, torch.stack(trl_losses), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "loss_type, label_smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)]
)
def test_batch_loss_and_metrics_match_trl(loss_type, label_smoothing):
    per_token, completion_mask, ref = _random_pairs(seed=1)
    num_pairs = len(ref) // 2
    policy = per_token.sum(1)
    num_tokens = completion_mask.sum(1)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy[:num_pairs], policy[num_pairs:], ref[:num_pairs], ref[num_pairs:], beta=0.1,
        loss_type=loss_type, label_smoothing=label_smoothing,
        chosen_num_tokens=num_tokens[:num_pairs], rejected_num_tokens=num_tokens[num_pairs:],
    )
    ours = dpo_metrics(losses, chosen_rewards, rejected_rewards, policy[:num_pairs], policy[num_pairs:])

    inputs = _trl_inputs(completion_mask, ref)
    trl_loss, trl_metrics = _trl_compute_loss(_FixedLogProbs(per_token), inputs, loss_type, 0.1, label_smoothing)
    assert 0 < ours["rewards/accuracies"] < 1  # a mixed batch, so the accuracy check means something
    assert ours["loss"] == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-5)
    for name, value in ours.items():
        if name != "loss":
            assert value == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-5), name


def _trl_inputs(completion_mask, ref):
    """What TRL's `_compute_loss` reads besides the log-probs (which `_FixedLogProbs` supplies)."""
    n = len(ref) // 2
    return {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
            "completion_mask": completion_mask, "ref_chosen_logps": ref[:n], "ref_rejected_logps": ref[n:]}


def test_trl_sigmoid_ignores_label_smoothing():
    """Pins the one formula difference we keep on purpose: TRL 1.16's `sigmoid` reads no label_smoothing, ours is
    cDPO. If a TRL upgrade changes this, revisit `dpo_loss` and the module docstring."""
    per_token, completion_mask, ref = _random_pairs(seed=2)
    inputs = _trl_inputs(completion_mask, ref)
    plain, _ = _trl_compute_loss(_FixedLogProbs(per_token), inputs, "sigmoid", 0.1, 0.0)
    smoothed, _ = _trl_compute_loss(_FixedLogProbs(per_token), inputs, "sigmoid", 0.1, 0.1)
    assert_close(plain, smoothed)


@pytest.fixture(scope="module")
def tiny_policy_and_reference():
    """Two randomly initialised 1-layer Llamas (different seeds, so log-ratios are not zero), with TRL's fused
    LM head added exactly as DPOTrainer.__init__ does. Built from a config: no download."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(LlamaForCausalLM(config).eval())
    policy, reference = models
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(reference)
    return policy, reference


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_end_to_end_matches_trl_on_a_tiny_model(tiny_policy_and_reference, loss_type):
    """Token ids -> TRL's collator -> TRL's fused log-probs and loss, versus model_logps -> dpo_loss -> dpo_metrics
    on the plain logits of the same models (our per-sequence unpadded forwards against TRL's padded batch). Checks
    the shift, the masks, IPO's token count and the `logits/*` metrics, not just the loss formula."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    policy, reference = tiny_policy_and_reference
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(1, 64, (n,), generator=g).tolist()

    examples = [
        {"prompt_ids": ids(3), "chosen_ids": ids(4), "rejected_ids": ids(2)},
        {"prompt_ids": ids(1), "chosen_ids": ids(1), "rejected_ids": ids(6)},
        {"prompt_ids": ids(5), "chosen_ids": ids(3), "rejected_ids": ids(3)},
    ]
    inputs = DataCollatorForPreference(pad_token_id=0)(examples)
    trl_loss, trl_metrics = _trl_compute_loss(policy, inputs, loss_type, 0.1, 0.0, ref_model=reference)

    mask = inputs["completion_mask"]
    with torch.no_grad():
        policy_logps, num_tokens, logit_sums = model_logps(policy, inputs["input_ids"], inputs["attention_mask"], mask)
        ref_logps, _, _ = model_logps(reference, inputs["input_ids"], inputs["attention_mask"], mask)
    assert num_tokens.tolist() == mask.sum(1).tolist()  # our count == TRL's IPO count

    n = len(examples)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_logps[:n], policy_logps[n:], ref_logps[:n], ref_logps[n:], beta=0.1, loss_type=loss_type,
        chosen_num_tokens=num_tokens[:n], rejected_num_tokens=num_tokens[n:],
    )
    # TRL's logits/*: the vocabulary-mean logit averaged over all response tokens of the batch (token-weighted).
    ours = dpo_metrics(
        losses, chosen_rewards, rejected_rewards, policy_logps[:n], policy_logps[n:],
        chosen_logits_mean=logit_sums[:n].sum() / num_tokens[:n].sum(),
        rejected_logits_mean=logit_sums[n:].sum() / num_tokens[n:].sum(),
    )
    assert ours["loss"] == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-5)
    assert set(ours) - {"loss"} <= set(trl_metrics)  # TRL's Trainer logs the loss itself, not in _metrics
    for name, value in ours.items():
        if name != "loss":
            assert value == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-5), name
