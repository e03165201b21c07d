"""Position ids for forwards over left-padded sequences, and which models must be left to compute their own.

A prompt batch is left-padded, so a training forward over prompt + response must use the positions
``generate`` used (``cumsum(mask) - 1``), or the log-probs of the update would not describe the sampled
tokens. Models with multimodal rotary positions (Qwen2-VL's M-RoPE and its successors: every transformers
class with a ``get_rope_index`` method) derive 3D positions from ``input_ids`` and the media inputs
themselves when given none; 1D positions would be wrong for their media tokens. The rule is the model's,
read from the model, so no algorithm argument depends on the modality.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["computes_own_positions", "position_ids_from_mask"]

_OWN_POSITIONS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (what ``generate`` uses): ``cumsum(mask) - 1`` clamped at 0."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def computes_own_positions(model: nn.Module) -> bool:
    """Whether ``model`` (any wrapper: DeepSpeed, DDP, PEFT, a score model) computes its own position ids."""
    if model not in _OWN_POSITIONS:
        _OWN_POSITIONS[model] = any(callable(getattr(m, "get_rope_index", None)) for m in model.modules())
    return _OWN_POSITIONS[model]
