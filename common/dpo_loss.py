"""DPO losses, sequence log-probs and metrics: the math shared by the reference actor and the trainer.

Everything here is plain tensor code, independent of Ray: the reference actor calls `model_logps` (the forward pass
plus `sequence_logps`, one sequence at a time) on each batch of pairs, the trainer calls it again on the policy and
then `dpo_loss` and `dpo_metrics`.

The formulas mirror TRL 1.16 (`trl/trainer/dpo_trainer.py`, `DPOTrainer._compute_loss`, the `loss_type` branches)
and `tests/test_dpo_loss.py` checks them against that code to 1e-5. Two places where we knowingly differ from TRL 1.16:

* `sigmoid` with `label_smoothing > 0` is conservative DPO (cDPO). TRL 1.16's `sigmoid` branch ignores
  `label_smoothing` (only `robust` and `exo_pair` read it); the cDPO formula we use is the one TRL's `sigmoid` used
  before 1.0 and that its `aot` and TPO losses still use. With the default `label_smoothing=0.0` the two agree.
* A `label_smoothing` that a loss would silently ignore (`hinge`, `ipo`) or that breaks it (>= 0.5) is a ValueError
  here; TRL ignores it, or only logs a warning for `robust`.

Papers:
    DPO:    Rafailov et al. 2023, "Direct Preference Optimization", https://arxiv.org/abs/2305.18290
    cDPO:   Mitchell 2023, "A note on DPO with noisy preferences", https://ericmitchell.ai/cdpo.pdf
    IPO:    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
            https://arxiv.org/abs/2310.12036
    hinge:  Zhao et al. 2023, "SLiC-HF", https://arxiv.org/abs/2305.10425
    robust: Chowdhury et al. 2024, "Provably Robust DPO", https://arxiv.org/abs/2403.00409
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_num_tokens: torch.Tensor | None = None,
    rejected_num_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO-family loss and the implicit rewards, as in TRL 1.16's `DPOTrainer._compute_loss`.

    With the log-ratios `c = policy_chosen - ref_chosen`, `r = policy_rejected - ref_rejected` and `d = c - r`:

        sigmoid  -(1 - ls) * logsigmoid(beta * d) - ls * logsigmoid(-beta * d)       DPO eq. 7; cDPO when ls > 0
        hinge    relu(1 - beta * d)                                                  SLiC-HF
        ipo      (c / n_chosen - r / n_rejected - 1 / (2 * beta)) ** 2              IPO eq. 17, beta is tau
        robust   ((1 - ls) * -logsigmoid(beta * d) - ls * -logsigmoid(-beta * d)) / (1 - 2 * ls)   rDPO

    IPO divides each summed log-ratio by its response length, exactly like TRL 1.16 (which documents that the IPO
    authors confirmed their results use this per-token form): without it the squared loss grows with the length
    and `beta` means something different for every dataset. Hence `chosen_num_tokens` / `rejected_num_tokens` are
    required for `ipo` (pass the counts `sequence_logps` returns) and ignored by the other losses.

    Args:
        policy_chosen_logps: [B] summed log-probs of the chosen responses under the policy (from `sequence_logps`).
        policy_rejected_logps: [B] same for the rejected responses.
        ref_chosen_logps: [B] summed log-probs of the chosen responses under the frozen reference model.
        ref_rejected_logps: [B] same for the rejected responses.
        beta: Strength of the pull towards the reference (tau in the IPO paper). Must be > 0.
        loss_type: One of "sigmoid", "ipo", "hinge", "robust" (TRL's names).
        label_smoothing: Assumed probability that a preference label is flipped, in [0, 0.5). Used by "sigmoid"
            (cDPO) and "robust"; must be 0 for "hinge" and "ipo", which have no such term.
        chosen_num_tokens: [B] response-token counts of the chosen responses; required for "ipo".
        rejected_num_tokens: [B] same for the rejected responses; required for "ipo".

    Returns:
        (losses, chosen_rewards, rejected_rewards), each [B]. `losses` is per example (the trainer takes the mean,
        as TRL does); the rewards are `beta * (policy - ref)` of the *summed* log-probs (also for ipo, as in TRL),
        detached: they are for logging only.

    Raises:
        ValueError: On an unknown `loss_type`, a `label_smoothing` the loss cannot use, or missing ipo token counts.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown DPO loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}.")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}.")
    if not 0.0 <= label_smoothing < 0.5:
        # At 0.5 the labels carry no information (and robust divides by zero); above it they are read backwards.
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}.")
    if label_smoothing > 0 and loss_type in ("hinge", "ipo"):
        raise ValueError(
            f"label_smoothing={label_smoothing} has no effect on loss_type={loss_type!r}; "
            "set it to 0, or use loss_type 'sigmoid' (cDPO) or 'robust'."
        )

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)

    if loss_type == "sigmoid":
        # logsigmoid rather than log(sigmoid(x)): stays finite for large |x|.
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - logits)
    elif loss_type == "ipo":
        if chosen_num_tokens is None or rejected_num_tokens is None:
            raise ValueError(
                "loss_type='ipo' needs chosen_num_tokens and rejected_num_tokens (the counts sequence_logps "
                "returns): TRL's IPO averages the log-ratios over response tokens."
            )
        # clamp(min=1) as TRL: an empty response (fully truncated) must not divide by zero.
        chosen_avg = chosen_logratios / chosen_num_tokens.clamp(min=1)
        rejected_avg = rejected_logratios / rejected_num_tokens.clamp(min=1)
        losses = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    else:  # robust
        # Unbiased estimate of the clean-label loss when each label is flipped with probability label_smoothing.
        clean = -(1 - label_smoothing) * F.logsigmoid(logits)
        flipped = -label_smoothing * F.logsigmoid(-logits)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of the masked (response) tokens of each sequence, and how many there are.

    The same function scores the policy (in the trainer) and the reference (in the reference actor), so the two
    log-probs that DPO subtracts are computed identically. It matches TRL's fused LM head (`add_fused_lm_head` in
    `trl/trainer/utils.py`) summed over the completion, and `selective_log_softmax` in the same file.

    Memory: `log_softmax` would materialise a second [B, T, V] tensor. Instead, per row we take
    `logit[label] - logsumexp(logits)` in float32, so the peak extra memory is one row's [T, V] in float32
    (the upcast also avoids the bfloat16 logsumexp instability TRL warns about).

    Args:
        logits: [B, T, V] model outputs for the full prompt + response sequence.
        labels: [B, T] token ids (the model's `input_ids`). Positions outside `loss_mask` may hold anything,
            e.g. -100.
        loss_mask: [B, T] bool or 0/1, true on response tokens (not prompt, not padding).

    Returns:
        (summed_logps, num_tokens), each [B]: float32 sum of the response tokens' log-probs, and int64 count of
        those tokens. The logits at position t predict the token at t + 1, so token 0 is never scored and the count
        is `loss_mask[:, 1:].sum(1)`. That equals TRL's IPO count (`completion_mask.sum(1)`) whenever the sequence
        starts with at least one prompt token, which every DPO pair does.
    """
    logits = logits[:, :-1]
    labels = labels[:, 1:]
    mask = loss_mask[:, 1:].bool()
    # Masked positions may hold -100 (the HF ignore index), which gather would reject; their value is zeroed below.
    labels = labels.masked_fill(~mask, 0)

    per_token = []
    for row_logits, row_labels in zip(logits, labels):  # one row at a time keeps the float32 copy small
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        per_token.append(picked - torch.logsumexp(row_logits, dim=-1))
    per_token = torch.stack(per_token)

    summed = (per_token * mask).sum(dim=1)
    num_tokens = mask.sum(dim=1)
    return summed, num_tokens


def _mean(x: torch.Tensor | float) -> float:
    return x.detach().float().mean().item() if isinstance(x, torch.Tensor) else float(x)


def dpo_metrics(
    loss: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_logits_mean: torch.Tensor | float | None = None,
    rejected_logits_mean: torch.Tensor | float | None = None,
) -> dict[str, float]:
    """Batch means of TRL's DPO metrics, under TRL's names so dashboards and the benchmark compare one-to-one.

    Mirrors the "Log the metrics" part of TRL 1.16's `DPOTrainer._compute_loss` (on one process; the caller
    averages across workers).

    Args:
        loss: Per-example losses from `dpo_loss` (or their mean).
        chosen_rewards: [B] from `dpo_loss`.
        rejected_rewards: [B] from `dpo_loss`.
        policy_chosen_logps: [B] summed policy log-probs of the chosen responses.
        policy_rejected_logps: [B] same for the rejected responses.
        chosen_logits_mean: Optional mean logit of the chosen responses, TRL's `logits/chosen`: the vocabulary-mean
            logit averaged over every chosen response token of the batch, i.e.
            `logit_sums[:B].sum() / num_tokens[:B].sum()` from `model_logps`. A tensor is averaged as is (so pass
            that token-weighted scalar, not per-sequence means); a float is used as is.
        rejected_logits_mean: Optional, same for the rejected responses (`[B:]`).

    Returns:
        `loss`, `rewards/chosen`, `rewards/rejected`, `rewards/accuracies` (fraction of pairs with chosen reward
        strictly above rejected: ties count as wrong, as in TRL), `rewards/margins`, `logps/chosen`,
        `logps/rejected`, plus `logits/chosen` and `logits/rejected` when given.
    """
    metrics = {
        "loss": _mean(loss),
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/accuracies": _mean(chosen_rewards > rejected_rewards),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards),
        "logps/chosen": _mean(policy_chosen_logps),
        "logps/rejected": _mean(policy_rejected_logps),
    }
    if chosen_logits_mean is not None:
        metrics["logits/chosen"] = _mean(chosen_logits_mean)
    if rejected_logits_mean is not None:
        metrics["logits/rejected"] = _mean(rejected_logits_mean)
    return metrics


def supports_logits_to_keep(model) -> bool:
    """Whether a Hugging Face causal LM (unwrapped: no DDP, no peft) takes `logits_to_keep` (transformers' name)."""
    import inspect

    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


def model_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                window: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probs of each sequence of a `collate_pairs` batch, each computed on its own.

    Every sequence runs through the model alone and unpadded (shape [1, len_i]), so its log-prob depends on its
    tokens only, never on the batch it came in: the reference actor (any `batch_size`) and the trainer (any
    `train_batch_size_per_device`) run the very same shapes, hence the same kernels and the same sums
    (`tests/test_step0.py` checks bf16, LoRA in train mode against the reference in inference mode, one and two
    threads). In a padded [2B, T] batch, bf16 kernels reduce in an order that depends on T and on 2B, and the
    summed log-prob of one sequence moved with the batch. Autograd sums the per-sequence graphs; one backward
    follows, under DDP too (each parameter's gradient hook still fires once; tested).

    With `window`, the LM head runs only on the positions that predict a response token (`logits_to_keep`): the
    prompt's logits are never used, and with a large vocabulary they are a large share of the step.
    `window=False` for models whose forward lacks `logits_to_keep` (see `supports_logits_to_keep`).

    Args:
        model: A causal LM (or its DDP / peft wrapper) returning `.logits`.
        input_ids: [2B, T] right-padded ids, as `common.tokenize.collate_pairs` returns them.
        attention_mask: [2B, T], 1 on real tokens (a prefix of each row).
        loss_mask: [2B, T], true on response tokens.
        window: Pass `logits_to_keep` to the model.

    Returns:
        (summed_logps, num_tokens, logit_sums), each [2B]: float32 summed response log-probs (differentiable), int64
        response-token counts (as `sequence_logps`), and float32 detached sums over the response-scoring positions
        of the vocabulary-mean logit. TRL's `logits/chosen` is `logit_sums[:B].sum() / num_tokens[:B].sum()` (a mean
        over all response tokens of the batch, not a mean of per-sequence means); likewise `logits/rejected`.
    """
    logps, counts, logit_sums = [], [], []
    for ids, attn, mask in zip(input_ids, attention_mask, loss_mask):
        length = int(attn.sum())
        ids, attn, mask = ids[None, :length], attn[None, :length], mask[None, :length]
        # The window starts one position before the first response token: that logit scores it.
        keep = min(length, length - int(mask.int().argmax()) + 1) if window else length
        logits = model(ids, attention_mask=attn, **({"logits_to_keep": keep} if window else {})).logits
        ids, mask = ids[:, length - keep:], mask[:, length - keep:]
        summed, n = sequence_logps(logits, ids, mask)
        with torch.no_grad():
            scoring = mask[:, 1:].bool()  # the logit at t scores token t + 1
            logit_sums.append(logits[:, :-1].float().mean(-1)[scoring].sum().reshape(1))
        logps.append(summed)
        counts.append(n)
        del logits  # freed before the next sequence's forward, not after it
    return torch.cat(logps), torch.cat(counts), torch.cat(logit_sums)
