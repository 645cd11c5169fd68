"""FSDP for the policy: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), applied by our own code on the
process group Ray Train set up (gloo on CPUs, NCCL on GPUs) — one code path for both. Ray's
`prepare_model(parallel_strategy="fsdp")` is FSDP v1 with `use_orig_params=False`: it refuses CPU workers, and it
refuses LoRA (a module whose parameters mix `requires_grad`). FSDP2 shards each parameter on its own (a DTensor),
so frozen base weights and trainable adapters live side by side, and parameter names stay those of the plain model:
a checkpoint written under FSDP is the same file a DDP run writes.

Every function here is a collective under FSDP: every rank calls it, in the same order.
"""
from __future__ import annotations

import torch


def shard_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                reshard_after_forward: bool = True) -> torch.nn.Module:
    """Shard each decoder layer, then the root (embeddings, final norm, head). Decoder layers are found
    generically: the modules whose class transformers names in `_no_split_modules` (LlamaDecoderLayer, ...).
    `reshard_after_forward`: False keeps the gathered parameters until backward (ZeRO-2 like, more memory)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    # Compute in the configured dtype; reduce gradients in fp32 so bf16 sums over ranks do not lose precision.
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    model.to(device)
    # DDP starts every rank from rank 0's weights; fully_shard keeps each rank's own values for its shard. Weights
    # read from the model folder agree already, but a fresh LoRA adapter is drawn per rank (seed + rank): take rank 0's.
    for p in model.parameters():
        if p.requires_grad:
            torch.distributed.broadcast(p.data, src=0)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(base).__name__}: no decoder layers found by _no_split_modules={sorted(names)}")
    return layers


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters, unsharded, on the CPU of rank 0 (empty elsewhere). One parameter is gathered at a
    time, so no rank ever holds more than one full tensor beyond its shard (LoRA: the frozen base is not gathered)."""
    rank0 = torch.distributed.get_rank() == 0
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            if rank0:
                out[name] = full.detach().cpu().contiguous()
    return out


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight, unsharded, on the CPU of rank 0 (empty elsewhere): what the final HF folder is built from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state unsharded on the CPU of rank 0 (empty elsewhere), keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainable: dict, optim: dict) -> None:
    """The inverse of `trainable_state` + `optimizer_state`: every rank passes the full dicts (each read the
    checkpoint), and keeps its shard of them."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    set_model_state_dict(model, trainable, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
