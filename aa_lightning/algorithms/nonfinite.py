"""Stop at the first NaN/inf loss or gradient norm, on every rank at once, naming the step and the quantity."""

from __future__ import annotations

from typing import Any, Literal

import torch

__all__ = ["NonFiniteError", "NonFiniteGuardMixin", "NonFinitePolicy", "any_rank_nonfinite"]

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


class NonFiniteGuardMixin:
    """The hooks of :class:`~aa_lightning.algorithms.base.AlignModule` that stop (``on_nonfinite: error``) or
    skip (``skip``) a step whose loss or gradient norm is NaN/inf, on every rank at once."""

    on_nonfinite: NonFinitePolicy
    skipped_steps: int

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """A NaN/inf loss on any rank stops the run before its gradients reach the weights."""
        if any_rank_nonfinite(loss, self.trainer.strategy if self._trainer is not None else None):
            self.handle_nonfinite("loss", loss)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """``train/grad_norm``: the global gradient norm of the step before clipping (identical on every rank:
        gradients are already all-reduced); a non-finite one stops or skips the step."""
        if not self.automatic_optimization or self.deepspeed_engine() is not None:
            return  # RL modules check in their own update; DeepSpeed in ``optimizer_step``
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16: inf gradients are the GradScaler's normal overflow steps, which it skips itself
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads)
        self.log("train/grad_norm", norm, batch_size=1)
        if not torch.isfinite(norm):
            self.handle_nonfinite("gradient norm", norm, optimizer)

    def handle_nonfinite(self, what: str, value: torch.Tensor, optimizer: Any = None) -> None:
        """``error``: raise naming the step and the quantity. ``skip``: drop this step's gradients."""
        step = self.trainer.global_step + 1 if self._trainer is not None else 0
        shown = value.detach().float().flatten()[:1].item() if value.numel() else value
        if self.on_nonfinite == "error":
            raise NonFiniteError(
                f"optimizer step {step}: the {what} is {shown}. Stopping (nothing is exported). Lower the "
                "learning rate or check the data; `--model.init_args.on_nonfinite skip` drops such steps instead."
            )
        if optimizer is not None:  # skip: AdamW leaves parameters without gradients untouched
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
