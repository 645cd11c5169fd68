"""Will the reference pool keep up with the trainers? An estimate from FLOPs per token, printed with stage 3's plan.

A reference forward costs about 2N FLOPs a token (N parameters). A training step costs a forward and a backward:
about 4N with LoRA (activation gradients only: the frozen base has no weight gradients), 6N in full fine-tuning,
and one more forward (2N) with gradient checkpointing. Both sides see the same tokens, so the token counts cancel
and what is left is how many accelerators each side has and how fast they are. Speeds are the vendors' nominal
dense bf16 TFLOPS; equal utilisation on both sides is the assumption. A reference forward (no grad, no optimizer)
usually runs closer to peak than a training step, so the estimate errs on the side of more actors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Nominal dense bf16 (fp16 for T4/V100) tensor TFLOPS per GPU, from the vendors' data sheets.
NOMINAL_TFLOPS = {"T4": 65, "V100": 125, "A10": 125, "A10G": 70, "L4": 121, "L40S": 362, "A100": 312,
                  "H100": 989, "H200": 989}


@dataclass(frozen=True)
class Balance:
    supply_over_demand: float  # reference pairs the pool delivers per pair the trainers consume
    balanced_concurrency: int  # reference actors that would just keep up
    basis: str  # what the speeds were taken from, for the printed line


def accelerator(resources: dict[str, float]) -> str | None:
    """The accelerator type a resource dict asks for (`accelerator_type:A10G` -> A10G), if any."""
    names = [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]
    return names[0] if names else None


def step_cost(lora: bool, gradient_checkpointing: bool) -> int:
    """FLOPs of one training step, in units of N FLOPs a token (a reference forward is 2)."""
    return (4 if lora else 6) + (2 if gradient_checkpointing else 0)


def estimate(*, trainers: int, trainer_speed: float, actors: int, actor_speed: float, cost: int,
             basis: str) -> Balance:
    """Supply (actors' forwards) over demand (trainers' steps), both in pairs per unit time."""
    supply = actors * actor_speed / 2
    demand = trainers * trainer_speed / cost
    return Balance(supply / demand, max(1, math.ceil(trainers * trainer_speed * 2 / (actor_speed * cost))), basis)


def pool_balance(*, gpu: bool, trainers: int, worker_resources: dict, trainer_cpus: float, actors: int,
                 actor_resources: dict, actor_cpus: float, actor_gpus: float, lora: bool,
                 gradient_checkpointing: bool) -> Balance | None:
    """The estimate for stage 3's plan; None when the speeds are unknown (a GPU type not in the table)."""
    cost = step_cost(lora, gradient_checkpointing)
    if not gpu:  # CPU workers: speed in proportion to the cores each asks for
        return estimate(trainers=trainers, trainer_speed=trainer_cpus, actors=actors, actor_speed=actor_cpus,
                        cost=cost, basis="CPU bundles")
    train_type, ref_type = accelerator(worker_resources), accelerator(actor_resources)
    if train_type not in NOMINAL_TFLOPS or ref_type not in NOMINAL_TFLOPS or not actor_gpus:
        return None
    return estimate(trainers=trainers, trainer_speed=NOMINAL_TFLOPS[train_type], actors=actors,
                    actor_speed=NOMINAL_TFLOPS[ref_type] * actor_gpus, cost=cost,
                    basis=f"{ref_type} {NOMINAL_TFLOPS[ref_type]} vs {train_type} {NOMINAL_TFLOPS[train_type]} "
                          f"nominal TFLOPS")


def describe(b: Balance, actors: int, trainers: int) -> str:
    """One plan line; says WARNING when the trainers would wait on the pool."""
    head = (f"reference pool supply / trainer demand ~ {b.supply_over_demand:.2f} "
            f"({actors} actors, {trainers} trainers; estimate from {b.basis})")
    if b.supply_over_demand < 0.9:
        return (f"WARNING: {head}: the trainers will wait on the reference pool; "
                f"logprob_processor_scaling_config.concurrency: {b.balanced_concurrency} would balance them")
    return head
