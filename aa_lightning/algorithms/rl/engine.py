"""Optimizer plumbing of the RL modules (manual optimization), the same under every strategy.

Separate actor/critic optimizers (each with its own lr and its own gradient clipping) or, under DeepSpeed (one
optimizer per engine), one optimizer with an actor and a critic parameter group. ``trainer.global_step``
counts *actor* optimizer updates in both cases, so ``max_steps`` means the same thing whatever the strategy.
Every DeepSpeed call goes through :class:`~aa_lightning.algorithms.rl.deepspeed_adapter.DeepSpeedAdapter`.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn

from aa_lightning.algorithms.optim import build_optimizer, param_groups
from aa_lightning.algorithms.rl.deepspeed_adapter import DeepSpeedAdapter
from aa_lightning.algorithms.rl.metrics import MetricAccumulator

__all__ = ["RLEngineMixin"]


def _no_closure() -> None:
    return None


class RLEngineMixin:
    """Mixed into :class:`~aa_lightning.algorithms.rl.module.OnlineRLModule` (a LightningModule).

    Reads ``num_mini_batches``, ``gradient_accumulation_steps`` and ``max_grad_norm`` (set by the module's
    ``__init__``) and the module's ``critic_modules()`` / ``critic_lr()``.
    """

    num_mini_batches: int
    gradient_accumulation_steps: int
    max_grad_norm: float | None

    # -- strategy ------------------------------------------------------------------------------------
    def uses_deepspeed(self) -> bool:
        return self._trainer is not None and isinstance(self.trainer.strategy, DeepSpeedStrategy)

    def deepspeed_adapter(self) -> DeepSpeedAdapter:
        """The DeepSpeed engine of this run behind the adapter (every call a no-op without DeepSpeed)."""
        return DeepSpeedAdapter(self.deepspeed_engine())

    def zero_stage(self) -> int:
        return self.deepspeed_adapter().zero_stage()

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def tokens_per_rank(self, local_tokens: torch.Tensor) -> torch.Tensor:
        """The step's token count over every rank divided by the world size: normalising each rank's token sum
        by it makes the ranks' averaged gradient a token mean over ALL ranks' tokens (not a mean of means)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return (self.reduce_sum(local_tokens.float()) / world).clamp(min=1)

    # -- optimizers ----------------------------------------------------------------------------------
    def critic_modules(self) -> list[nn.Module]:
        """Trained models other than the actor (their optimizer / parameter group uses ``critic_lr``)."""
        return []

    def critic_lr(self) -> float:
        return self.optim.lr

    def trained_modules(self) -> list[nn.Module]:
        return [self.model, *self.critic_modules()]

    def updates_per_rollout(self) -> int:
        """Optimizer steps each rollout makes (overridden by algorithms with several passes)."""
        return self.num_mini_batches // self.gradient_accumulation_steps

    def total_optimizer_steps(self) -> int:
        if self._trainer is None:
            return 1000
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        try:
            return int(self.trainer.estimated_stepping_batches) * self.updates_per_rollout()
        except Exception:  # an infinite loader
            return 1000

    def configure_optimizers(self) -> Any:
        wd = self.optim.weight_decay
        total = self.total_optimizer_steps()
        critics = self.critic_modules()
        if self.uses_deepspeed():
            # DeepSpeed drives one optimizer per engine: actor and critics become parameter groups with
            # their own learning rates; the schedule scales each group's own peak lr.
            groups = [{**g, "role": "actor"} for g in param_groups([self.model], wd, lr=self.optim.lr)]
            groups += [{**g, "role": "critic"} for g in param_groups(critics, wd, lr=self.critic_lr())]
            optimizer, scheduler = build_optimizer(groups, self.optim, total)
            self.trainer.strategy.config["gradient_clipping"] = float(self.max_grad_norm or 0.0)
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        actor_opt, actor_sched = build_optimizer(param_groups([self.model], wd), self.optim, total)
        if not critics:
            return {"optimizer": actor_opt, "lr_scheduler": actor_sched}
        critic_opt, critic_sched = build_optimizer(
            param_groups(critics, wd, lr=self.critic_lr()), self.optim, total
        )
        return [
            {"optimizer": actor_opt, "lr_scheduler": actor_sched},
            {"optimizer": critic_opt, "lr_scheduler": critic_sched},
        ]

    def log_learning_rates(self) -> None:
        """``train/lr`` (actor) and ``train/lr_critic``, whether they live in two optimizers or in two
        parameter groups of one (DeepSpeed)."""
        if self._trainer is None or not self.trainer.optimizers:
            return
        seen: dict[str, float] = {}
        for i, opt in enumerate(self.trainer.optimizers):
            for group in opt.param_groups:
                name = group.get("role", "actor" if i == 0 else "critic")
                seen.setdefault(name, float(group["lr"]))
        for name, lr in seen.items():
            self.log("train/lr" if name == "actor" else f"train/lr_{name}", lr, batch_size=1)

    # -- one minibatch, one update -------------------------------------------------------------------
    def start_minibatch(self) -> None:
        """Call before the forwards of each minibatch: what ``DeepSpeedEngine.forward`` would do.

        Lightning runs the whole ``training_step`` inside ONE engine forward, so without this ZeRO never
        learns that a new micro-batch started: ZeRO-3 keeps ``micro_step_id == 0`` and *overwrites* the
        gradient partitions of earlier minibatches instead of accumulating them. The rollout engine hears that
        an update phase runs (:meth:`~.rollout_engines.base.RolloutEngine.before_policy_update`).
        """
        self.deepspeed_adapter().start_micro_batch()
        self.policy_update_starting()  # the rollout is done: an engine may sleep until the next one

    def backward_minibatch(self, loss: torch.Tensor, last_in_group: bool) -> None:
        """Backward of one minibatch; under DeepSpeed mark whether it closes the accumulation group."""
        self.deepspeed_adapter().set_accumulation_boundary(last_in_group)
        self.manual_backward(loss)

    def optimizer_update(self, stats: MetricAccumulator) -> None:
        """Clip, step every optimizer, zero grads, step the schedules. Counts ONE global step.

        ``train/grad_norm`` is the global norm over every trained model before clipping (actor and critics
        together, as DeepSpeed's one optimizer reports it), so it reads the same under every strategy; a
        non-finite norm stops the run before any weight changes (outside DeepSpeed) or right after the step.
        """
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        deepspeed = self.deepspeed_adapter()
        if not deepspeed.active and self._clip_or_skip(optimizers, stats):
            return
        optimizers[0].step()
        for opt in optimizers[1:]:
            # critic optimizers step through the strategy directly, so Lightning's step counter (global_step)
            # counts actor updates only: max_steps then means the same with one or two optimizers
            self.trainer.strategy.optimizer_step(opt.optimizer, closure=_no_closure)
        norm = deepspeed.global_grad_norm(self.device)
        if norm is not None:
            stats.add("train/grad_norm", norm, 1)
            if not torch.isfinite(norm):
                self.handle_nonfinite("gradient norm", norm)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                scheduler.step()
        self.policy_weights_updated()  # an engine with its own copy of the weights re-syncs before sampling

    def _clip_or_skip(self, optimizers: list[Any], stats: MetricAccumulator) -> bool:
        """Clip each optimizer's gradients (outside DeepSpeed); True when a non-finite norm drops the update."""
        max_norm = self.max_grad_norm or 0.0
        norms = []
        for name, opt in zip(("actor", "critic"), optimizers):
            params = [p for g in opt.optimizer.param_groups for p in g["params"] if p.grad is not None]
            if not params:
                continue
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
            stats.add(f"train/{name}_grad_norm", norm, 1)
            norms.append(norm)
        if not norms:
            return False
        total = torch.stack(norms).float().square().sum().sqrt()
        stats.add("train/grad_norm", total, 1)
        if torch.isfinite(total):
            return False
        self.handle_nonfinite("gradient norm", total)  # raises unless on_nonfinite: skip
        for opt in optimizers:  # skip: this update's gradients are dropped, nothing steps
            opt.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        stats.add("train/skipped_steps", torch.tensor(float(self.skipped_steps), device=self.device), 1)
        return True
