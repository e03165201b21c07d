"""Full-precision CPU state dicts for export, whatever the strategy: plain, ZeRO-3 partitioned, LoRA.

The ``iter_*`` generators stream the same tensors one submodule at a time (a rollout engine's weight sync
loads each as it comes, so the full model is never gathered at once); the dict functions collect them.

Under ZeRO-3 every parameter holds only its shard (``numel() == 0`` locally), so ``state_dict()`` and peft's
``merge_adapter`` would write empty tensors. Everything here gathers one submodule at a time
(``GatheredParameters``, ``modifier_rank=None``: the shards are left untouched) and copies to CPU, so peak
memory is one layer plus the CPU copy. Outside ZeRO-3 the same code runs with gathering disabled.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from aa_lightning.algorithms.frozen import FROZEN_PREFIX
from aa_lightning.algorithms.zero3 import gathered, is_partitioned
from aa_lightning.models.unwrap import unwrap

__all__ = [
    "iter_merged_lora_tensors",
    "iter_plain_tensors",
    "lora_adapter_state_dict",
    "merged_lora_state_dict",
    "nonfinite_export_problem",
    "plain_state_dict",
]


def _local_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers (what ``state_dict`` holds; non-persistent ones, e.g. rotary
    ``inv_freq``, are rebuilt by the model and would be "unexpected" keys on reload)."""
    skip = getattr(module, "_non_persistent_buffers_set", set())
    buffers = [(n, b) for n, b in module.named_buffers(recurse=False) if n not in skip]
    return list(module.named_parameters(recurse=False)) + buffers


def _copy_local(
    prefix: str, module: nn.Module, keep: bool, to_cpu: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Copies of ``module``'s own tensors under ``prefix`` (gathered first when they are ZeRO-3 shards)."""
    with gathered(module.parameters(recurse=False)):
        if keep:
            for name, tensor in _local_tensors(module):
                yield f"{prefix}.{name}" if prefix else name, _copy(tensor, to_cpu)


def _copy(tensor: torch.Tensor, to_cpu: bool) -> torch.Tensor:
    """A copy that outlives the gather (the shards' full buffer is released or reused after it)."""
    tensor = tensor.detach()
    return tensor.cpu().clone() if to_cpu else tensor.clone()


def _nothing_to_join(module: nn.Module, keep: bool) -> bool:
    """A rank that keeps no copy only has to take part when the gathers are collectives (ZeRO-3)."""
    return not keep and not is_partitioned(module.parameters())


def iter_plain_tensors(
    module: nn.Module,
    skip_prefixes: tuple[str, ...] = (FROZEN_PREFIX,),
    keep: bool = True,
    to_cpu: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, copy)`` of ``module``'s parameters and buffers, one submodule (one gather) at a time.

    ``keep=False`` (ranks that do not write): join the gathers, yield nothing. ``to_cpu=False``: the copies
    stay on the parameters' device.
    """
    module = unwrap(module)
    if _nothing_to_join(module, keep):
        return
    for prefix, sub in module.named_modules():
        if not (prefix.startswith(skip_prefixes) or f"{prefix}.".startswith(skip_prefixes)):
            yield from _copy_local(prefix, sub, keep, to_cpu)


def plain_state_dict(
    module: nn.Module, skip_prefixes: tuple[str, ...] = (FROZEN_PREFIX,), keep: bool = True
) -> dict[str, torch.Tensor]:
    """CPU copy of ``module``'s parameters and buffers (ZeRO-3 shards gathered submodule by submodule).

    ``keep=False`` (ranks that do not write): join the gathers, copy nothing, return ``{}``.
    """
    return dict(iter_plain_tensors(module, skip_prefixes, keep))


def iter_merged_lora_tensors(
    peft_model: nn.Module, keep: bool = True, to_cpu: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, copy)`` of the base model's tensors with every active LoRA adapter merged in, keys as the base
    model names them, one layer (one gather) at a time. ``keep`` and ``to_cpu`` as in
    :func:`iter_plain_tensors`.

    Uses each layer's own ``get_delta_weight`` (peft's merge maths) on a gathered copy, so neither the training
    weights nor the shards change.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    base = unwrap(peft_model).get_base_model()
    if _nothing_to_join(base, keep):
        return
    handled: list[str] = []
    for prefix, sub in base.named_modules():
        if any(prefix.startswith(f"{p}.") for p in handled):
            continue  # lora_A / lora_B / base_layer / the copies of a layer handled below
        if isinstance(sub, ModulesToSaveWrapper):  # a fully trained module (a score head): its trained copy
            handled.append(prefix)
            trained = sub.modules_to_save[sub.active_adapters[0]]
            for inner, part in trained.named_modules():
                yield from _copy_local(f"{prefix}.{inner}" if inner else prefix, part, keep, to_cpu)
            continue
        if isinstance(sub, BaseTunerLayer):
            handled.append(prefix)
            base_layer = sub.get_base_layer()
            with gathered(sub.parameters()), torch.no_grad():
                if not keep:
                    continue
                tensors = dict(_local_tensors(base_layer))
                weight = tensors["weight"].detach().float().clone()
                for adapter in sub.active_adapters:
                    if adapter in getattr(sub, "lora_A", {}):
                        weight += sub.get_delta_weight(adapter).float()
                tensors["weight"] = weight.to(base_layer.weight.dtype)
                for name, tensor in tensors.items():
                    yield f"{prefix}.{name}", _copy(tensor, to_cpu)
            continue
        yield from _copy_local(prefix, sub, keep, to_cpu)


def merged_lora_state_dict(peft_model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The base model's state dict with every active LoRA adapter merged in, keys as the base model names them.

    Uses each layer's own ``get_delta_weight`` (peft's merge maths) on a gathered copy, so neither the training
    weights nor the shards change. ``keep`` as in :func:`plain_state_dict`.
    """
    return dict(iter_merged_lora_tensors(peft_model, keep))


def lora_adapter_state_dict(peft_model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The full (gathered) state dict of a peft model, keys as peft names them; ``save_pretrained`` keeps
    only the adapter weights of it."""
    return plain_state_dict(unwrap(peft_model), skip_prefixes=(), keep=keep)


def nonfinite_export_problem(state_dict: dict[str, torch.Tensor], where: str) -> str | None:
    """Why ``state_dict`` must not be written (NaN/inf weights, or only empty shards), or None.

    An export is what users deploy: a model with non-finite weights is never written.
    """
    bad = [name for name, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        return f"not exporting to {where}: {len(bad)} tensors hold NaN/inf values ({shown})"
    if state_dict and all(t.numel() == 0 for t in state_dict.values()):
        return f"not exporting to {where}: every tensor is empty (ZeRO-3 shards were not gathered)"
    return None
