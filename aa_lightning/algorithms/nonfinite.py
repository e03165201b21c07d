"""Stop at the first NaN/inf loss or gradient norm, on every rank at once, naming the step and the quantity."""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["NonFiniteError", "NonFinitePolicy", "any_rank_nonfinite"]

NonFinitePolicy = Literal["error", "skip"]


class NonFiniteError(FloatingPointError):
    """A loss, gradient norm or exported weight is NaN/inf: the run stops instead of training on NaNs."""


def any_rank_nonfinite(value: torch.Tensor, strategy: object | None = None) -> bool:
    """Whether ``value`` is non-finite on ANY rank (one tiny all-reduce when several processes run).

    Every rank gets the same answer, so all of them stop (or skip) together instead of one rank raising
    while the others wait in the next collective.
    """
    bad = (~torch.isfinite(value.detach().float())).any().to(torch.float32).reshape(1)
    world = getattr(strategy, "world_size", 1) or 1
    if world > 1:
        bad = strategy.reduce(bad, reduce_op="sum")  # type: ignore[union-attr]
    return bool(bad.item() > 0)
