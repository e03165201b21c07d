"""Full-precision CPU state dicts for export, whatever the strategy: plain, ZeRO-3 partitioned, LoRA.

Under ZeRO-3 every parameter holds only its shard (``numel() == 0`` locally), so ``state_dict()`` and peft's
``merge_adapter`` would write empty tensors. Everything here gathers one submodule at a time
(``GatheredParameters``, ``modifier_rank=None``: the shards are left untouched) and copies to CPU, so peak
memory is one layer plus the CPU copy. Outside ZeRO-3 the same code runs with gathering disabled.
"""

from __future__ import annotations

import torch
from torch import nn

from aa_lightning.algorithms.frozen import FROZEN_PREFIX, unwrap
from aa_lightning.algorithms.nonfinite import NonFiniteError
from aa_lightning.algorithms.zero3 import gathered

__all__ = ["finite_or_raise", "lora_adapter_state_dict", "merged_lora_state_dict", "plain_state_dict"]


def _local_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))


def plain_state_dict(
    module: nn.Module, skip_prefixes: tuple[str, ...] = (FROZEN_PREFIX,)
) -> dict[str, torch.Tensor]:
    """CPU copy of ``module``'s parameters and buffers (ZeRO-3 shards gathered submodule by submodule)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, sub in unwrap(module).named_modules():
        if prefix.startswith(skip_prefixes) or f"{prefix}.".startswith(skip_prefixes):
            continue
        with gathered(sub.parameters(recurse=False)):
            for name, tensor in _local_tensors(sub):
                out[f"{prefix}.{name}" if prefix else name] = tensor.detach().cpu().clone()
    return out


def merged_lora_state_dict(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every active LoRA adapter merged in, keys as the base model names them.

    Uses each layer's own ``get_delta_weight`` (peft's merge maths) on a gathered copy, so neither the training
    weights nor the shards change.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    base = unwrap(peft_model).get_base_model()
    out: dict[str, torch.Tensor] = {}
    lora_prefixes: list[str] = []
    for prefix, sub in base.named_modules():
        if any(prefix.startswith(f"{p}.") for p in lora_prefixes):
            continue  # lora_A / lora_B / base_layer of a layer handled below
        if isinstance(sub, ModulesToSaveWrapper):  # a fully trained module (a score head): its trained copy
            lora_prefixes.append(prefix)
            trained = sub.modules_to_save[sub.active_adapters[0]]
            with gathered(trained.parameters()):
                for name, tensor in _local_tensors(trained):
                    out[f"{prefix}.{name}"] = tensor.detach().cpu().clone()
            continue
        if isinstance(sub, BaseTunerLayer):
            lora_prefixes.append(prefix)
            base_layer = sub.get_base_layer()
            with gathered(sub.parameters()), torch.no_grad():
                tensors = dict(_local_tensors(base_layer))
                weight = tensors["weight"].detach().float().clone()
                for adapter in sub.active_adapters:
                    if adapter in getattr(sub, "lora_A", {}):
                        weight += sub.get_delta_weight(adapter).float()
                tensors["weight"] = weight.to(base_layer.weight.dtype)
                for name, tensor in tensors.items():
                    out[f"{prefix}.{name}"] = tensor.detach().cpu().clone()
            continue
        with gathered(sub.parameters(recurse=False)):
            for name, tensor in _local_tensors(sub):
                out[f"{prefix}.{name}" if prefix else name] = tensor.detach().cpu().clone()
    return out


def lora_adapter_state_dict(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (gathered) state dict of a peft model, keys as peft names them; ``save_pretrained`` keeps
    only the adapter weights of it."""
    return plain_state_dict(unwrap(peft_model), skip_prefixes=())


def finite_or_raise(state_dict: dict[str, torch.Tensor], where: str) -> None:
    """Refuse to write a model with NaN/inf weights (an export is what users deploy)."""
    bad = [name for name, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(f"not exporting to {where}: {len(bad)} tensors hold NaN/inf values ({shown})")
    empty = [name for name, t in state_dict.items() if t.numel() == 0]
    if empty and len(empty) == len(state_dict):
        raise RuntimeError(
            f"not exporting to {where}: every tensor is empty (ZeRO-3 shards were not gathered)"
        )
