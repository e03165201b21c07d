"""Safe RLHF: PPO-Lagrangian with a reward and a cost (Dai et al. 2023, arXiv:2310.12773).

On top of PPO: a frozen cost model (a :class:`ScoreModel`) and/or registered cost functions, a trained cost
critic, and a Lagrange multiplier ``lambda = exp(log_lambda)`` learned by gradient descent on
``-lambda * (J_c - cost_limit)`` (:func:`losses.lagrange_multiplier_loss`) with its own learning rate, where
``J_c`` is the mean episode cost over all ranks (optionally over a window of recent rollouts). Lambda grows
while episodes cost more than ``cost_limit`` and shrinks once they cost less.

Reward and cost each get their own per-token stream and GAE. The KL penalty ``kl_coef * KL_t`` is taken
from the reward stream and added to the cost stream, so the combined actor advantage
``(A_r - lambda * A_c) / (1 + lambda)`` (:func:`losses.lagrangian_advantage`) carries the KL penalty with the
same weight ``kl_coef`` whatever lambda is. The two streams are mixed raw and the mix is whitened once
(``whiten_advantages``), so lambda weighs reward against cost in their own units.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
from torch import nn

from aa_lightning.algorithms.losses import lagrange_multiplier_loss, lagrangian_advantage
from aa_lightning.algorithms.rl.metrics import MetricAccumulator, RunningMoments, explained_variance
from aa_lightning.algorithms.rl.ppo import PPOModule
from aa_lightning.algorithms.rl.rollout import Rollout
from aa_lightning.config_coercion import as_config_list
from aa_lightning.rewards import RewardSpec, WeightedRewards

__all__ = ["SafeRLHFModule"]


class SafeRLHFModule(PPOModule):
    """PPO-Lagrangian: maximise reward subject to ``E[cost] <= cost_limit``.

    Args:
        cost_model_name_or_path: frozen cost model (:class:`ScoreModel`); optional when cost functions are given.
        cost_model_weight: weight of the cost model's end score in the summed cost.
        cost_functions: registered functions used as costs (same registry as rewards).
        cost_critic_model_name_or_path: cost critic initialisation; defaults to the cost model (when it shares
            the actor's tokenizer), else the actor.
        cost_limit: threshold ``d`` on the mean episode cost.
        lambda_init: initial multiplier (> 0; it is learned in log space).
        lambda_lr: learning rate of ``log_lambda`` (plain gradient descent).
        lambda_max: upper bound of lambda (None: unbounded).
        lambda_update_delay_steps: rollouts to wait before lambda starts moving (let the cost critic settle).
        episode_cost_window_size: the multiplier sees the mean cost over this many recent rollouts.
        normalize_cost: running normalisation of the cost score (statistics kept in checkpoints).
        **kwargs: see :class:`PPOModule`.
    """

    def __init__(
        self,
        *args: Any,
        cost_model_name_or_path: str | None = None,
        cost_model_weight: float = 1.0,
        cost_functions: list[RewardSpec] | None = None,
        cost_critic_model_name_or_path: str | None = None,
        cost_limit: float = 0.0,
        lambda_init: float = 1.0,
        lambda_lr: float = 0.1,
        lambda_max: float | None = None,
        lambda_update_delay_steps: int = 0,
        episode_cost_window_size: int = 1,
        normalize_cost: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if lambda_init <= 0:
            raise ValueError("lambda_init must be > 0 (lambda is learned as log_lambda)")
        if episode_cost_window_size < 1:
            raise ValueError("episode_cost_window_size must be >= 1")
        self.cost_model_name_or_path = cost_model_name_or_path
        self.cost_model_weight = cost_model_weight
        self.cost_critic_model_name_or_path = cost_critic_model_name_or_path
        self.cost_limit = cost_limit
        self.lambda_lr = lambda_lr
        self.lambda_max = lambda_max
        self.lambda_update_delay_steps = lambda_update_delay_steps
        self.normalize_cost = normalize_cost
        self.cost_fns = WeightedRewards(as_config_list(RewardSpec, cost_functions, "cost_functions"))
        if cost_model_name_or_path is None and not len(self.cost_fns):
            raise ValueError("give a cost_model_name_or_path and/or cost_functions")
        self.cost_critic: nn.Module | None = None
        self.cost_moments = RunningMoments()
        # float64 tensor attribute, not a buffer: bf16 precision would cast a buffer (see RunningMoments)
        self.log_lambda = torch.tensor(math.log(lambda_init), dtype=torch.float64)
        self._episode_costs: deque[torch.Tensor] = deque(maxlen=episode_cost_window_size)

    # -- models ----------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if self.cost_model_name_or_path:
            self.load_frozen("cost", self.cost_model_name_or_path, score_model=True)
        path = self.critic_init_path(
            self.cost_critic_model_name_or_path, self.cost_model, self.cost_tokenizer
        )
        self.cost_critic = self.load_trainable_score_model(path, self.critic_head_init_std)

    def critic_modules(self) -> list[nn.Module]:
        return [self.critic, self.cost_critic]

    @property
    def cost_model(self) -> nn.Module | None:
        return self.frozen.get("cost")

    @property
    def cost_tokenizer(self) -> Any:
        return self.frozen.tokenizer("cost")

    # -- Lagrange multiplier ---------------------------------------------------------------------------
    @property
    def lagrange_multiplier(self) -> torch.Tensor:
        return self.log_lambda.exp()

    def update_lagrange_multiplier(self, episode_cost: torch.Tensor | float) -> torch.Tensor:
        """One gradient step of ``log_lambda`` on the mean cost of the recent episodes; returns lambda.

        ``log_lambda <- log_lambda - lambda_lr * d/dlog_lambda[-lambda * (J_c - d)]``
        ``= log_lambda + lambda_lr * lambda * (J_c - d)``, so lambda rises while ``J_c > d``.
        """
        device = episode_cost.device if isinstance(episode_cost, torch.Tensor) else self.log_lambda.device
        self.log_lambda = self.log_lambda.to(device)
        self._episode_costs.append(torch.as_tensor(episode_cost, dtype=torch.float64, device=device).detach())
        window_cost = torch.stack([c.to(device) for c in self._episode_costs]).mean()
        if self._rollout_index >= self.lambda_update_delay_steps:
            with torch.enable_grad():
                log_lambda = self.log_lambda.detach().clone().requires_grad_(True)
                loss = lagrange_multiplier_loss(log_lambda, window_cost, self.cost_limit)
                (grad,) = torch.autograd.grad(loss, log_lambda)
            new = log_lambda.detach() - self.lambda_lr * grad
            if self.lambda_max is not None:
                new = new.clamp(max=math.log(self.lambda_max))
            self.log_lambda = new
        return self.log_lambda.exp()

    # -- experience ------------------------------------------------------------------------------------
    def compute_costs(self, rollout: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of the cost model's end score and the cost functions: ``(total (N,), parts)``."""
        return self.weighted_scores(
            rollout, self.cost_model, self.cost_tokenizer, self.cost_model_weight, self.cost_fns, "cost_model"
        )

    def score_rollout(self, rollout: Rollout, stats: MetricAccumulator) -> None:
        super().score_rollout(rollout, stats)
        costs, parts = self.compute_costs(rollout)
        rollout["costs"] = costs
        stats.add_std("rollout/cost", costs)
        for name, values in parts.items():
            stats.add_mean(f"rollout/cost/{name}", values)

    @torch.no_grad()
    def forward_rollout(self, rollout: Rollout, stats: MetricAccumulator) -> None:
        super().forward_rollout(rollout, stats)
        rollout["old_cost_values"] = self.chunked(
            lambda ro: self.value_forward(self.cost_critic, ro), rollout
        )

    @torch.no_grad()
    def compute_advantages(self, rollout: Rollout, stats: MetricAccumulator) -> None:
        """Raw reward and cost advantages, mixed as ``(A_r - lambda A_c) / (1 + lambda)``, then whitened once.

        Whitening each stream first would make lambda trade standardised quantities: a cost stream with a
        tiny spread would weigh as much as one with a large spread, whatever the costs are.
        """
        reward_adv = self.reward_advantages(rollout, stats)  # also fills returns, sequence_rewards
        mask = rollout.response_mask
        moments = self.cost_moments if self.normalize_cost else None
        cost_score = self.shaped_score(
            rollout["costs"], rollout.has_eos, moments, stats, name="cost", eos_penalty=False
        )
        cost_rewards, _ = self.token_rewards(cost_score, rollout, kl_sign=1.0, turn_rewards=False)
        cost_adv, cost_returns = self.gae(cost_rewards, rollout["old_cost_values"], mask)
        rollout["cost_returns"] = cost_returns
        totals = self.reduce_sum(
            torch.stack(
                [
                    rollout["costs"].double().sum(),
                    torch.tensor(float(len(rollout)), dtype=torch.float64, device=self.device),
                ]
            )
        )
        lam = self.update_lagrange_multiplier(totals[0] / totals[1])
        rollout["reward_advantages"], rollout["cost_advantages"] = reward_adv, cost_adv
        mixed = lagrangian_advantage(reward_adv, cost_adv, lam.to(cost_adv.dtype))
        rollout["advantages"] = self.whiten(mixed, mask)
        stats.add("train/lambda", lam, 1)
        stats.add("rollout/episode_cost", torch.stack(list(self._episode_costs)).mean(), 1)
        stats.add_mean("rollout/cost_return", cost_returns, mask)
        stats.add(
            "train/cost_explained_variance",
            explained_variance(rollout["old_cost_values"], cost_returns, mask),
            1,
        )

    def critic_loss(self, mb: Rollout, stats: MetricAccumulator, token_weight: torch.Tensor) -> torch.Tensor:
        reward_part = super().critic_loss(mb, stats, token_weight)
        cost_part = self.value_loss(
            self.cost_critic, mb, "old_cost_values", "cost_returns", "cost_value", stats, token_weight
        )
        return reward_part + cost_part

    def training_step(self, batch: Any, batch_idx: int) -> None:
        prompt_batch, ptx_batch = self.split_batch(batch)
        rollout, stats = self.experience(prompt_batch)
        self.update(rollout, ptx_batch, stats)
        self.log_metrics(
            stats,
            rollout,
            {"score": rollout["scores"], "cost": rollout["costs"], "reward": rollout["sequence_rewards"]},
        )
        self._rollout_index += 1

    # -- checkpoint state ------------------------------------------------------------------------------
    def rl_state_dict(self) -> dict[str, Any]:
        return {
            **super().rl_state_dict(),
            "log_lambda": self.log_lambda.detach().cpu(),
            "episode_costs": [c.detach().cpu() for c in self._episode_costs],
            "cost_moments": self.cost_moments.state_dict(),
        }

    def load_rl_state_dict(self, state: dict[str, Any]) -> None:
        super().load_rl_state_dict(state)
        if "log_lambda" in state:
            self.log_lambda = state["log_lambda"].to(torch.float64)
        if "episode_costs" in state:
            self._episode_costs.clear()
            self._episode_costs.extend(c.to(torch.float64) for c in state["episode_costs"])
        if "cost_moments" in state:
            self.cost_moments.load_state_dict(state["cost_moments"])
