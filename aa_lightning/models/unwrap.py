"""``unwrap``: the model under its DeepSpeed / DDP / peft wrappers.

Neutral ground: algorithms, callbacks and tests all need the bare transformers model, and none of them may
reach into another's internals to get it.
"""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DeepSpeed/DDP/peft wrappers (each keeps the wrapped one in ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model
