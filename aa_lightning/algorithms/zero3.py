"""ZeRO-3 details the algorithms need, in one place: gathering shards, and initialising weights in shards.

Under ``deepspeed.zero.Init`` a parameter is partitioned as soon as the module that creates it finishes its
``__init__``; any later in-place write to it (``nn.init.zeros_``) touches an empty local tensor and is lost.
Libraries that initialise after construction (peft zeroes ``lora_B`` after creating the ``nn.Linear``) then
silently start from the wrong weights. The helpers here redo such writes inside ``GatheredParameters`` with
``modifier_rank=0`` so they land in every shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["deepspeed_engine_of", "gathered", "initialise_lora_in_shards", "is_partitioned"]


def deepspeed_engine_of(trainer: Any) -> Any:
    """The DeepSpeed engine of ``trainer``'s run (None without a trainer, without DeepSpeed, or before setup)."""
    if trainer is None:
        return None
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = trainer.strategy
    return getattr(strategy, "deepspeed_engine", None) if isinstance(strategy, DeepSpeedStrategy) else None


def is_partitioned(params: Iterable[nn.Parameter]) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


def gathered(
    params: Iterable[nn.Parameter], modifier_rank: int | None = None
) -> contextlib.AbstractContextManager:
    """Full parameters inside the block when they are ZeRO-3 shards (a no-op otherwise).

    ``modifier_rank=None``: read only, the shards stay as they are; ``0``: rank 0's writes are scattered back.
    """
    params = list(params)
    if not is_partitioned(params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def initialise_lora_in_shards(peft_model: nn.Module) -> None:
    """Run peft's LoRA initialisation again on gathered shards (``lora_B = 0``: the policy starts as the base)."""
    from peft.tuners.lora.layer import LoraLayer

    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        params = [p for name, p in module.named_parameters() if "lora_" in name]
        if not is_partitioned(params):
            continue
        config = peft_model.peft_config
        for adapter in list(module.lora_A.keys()):
            init = config[adapter].init_lora_weights if adapter in config else True
            with gathered(params, modifier_rank=0):
                module.reset_lora_parameters(adapter, init)
