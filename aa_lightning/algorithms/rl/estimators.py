"""GRPO's pluggable advantage estimators and policy losses: which ones exist, which combine, how they run.

The estimators (pure functions in :mod:`aa_lightning.algorithms.losses.advantages`) differ only in the
baseline and normalisation of the rewards, so they are options of one module rather than modules:

* ``grpo``: group mean / std (arXiv:2402.03300; ``scale: none`` is Dr. GRPO);
* ``rloo``: leave-one-out group mean (arXiv:2402.14740);
* ``reinforce_pp``: per-token returns with the KL folded into the reward, normalised over the global batch
  (arXiv:2501.03262); ``reinforce_pp_baseline`` centres each score on its group mean first;
* ``remax``: the reward of the prompt's greedy response is the baseline (arXiv:2310.10505): one extra
  ``generate(do_sample=False)`` per rollout.

The REINFORCE++ pair takes the KL out of the loss (``beta`` weighs the k1 KL of the reward instead), so it is
not counted twice. Combinations that cannot work are refused when the module is built.
"""

from __future__ import annotations

from typing import Any

import torch

from aa_lightning.algorithms.logprobs import masked_mean
from aa_lightning.algorithms.losses import (
    grpo_advantages,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
)
from aa_lightning.algorithms.rl.metrics import MetricAccumulator
from aa_lightning.algorithms.rl.rollout import Rollout

__all__ = ["AdvantageEstimatorMixin", "check_estimator_options"]

GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_pp_baseline")  # need num_generations >= 2
TOKEN_LEVEL_ESTIMATORS = ("reinforce_pp", "reinforce_pp_baseline")  # per-token advantages, KL in the reward


def check_estimator_options(
    advantage_estimator: str, policy_loss: str, num_generations: int, scale: str
) -> None:
    """Refuse, at construction, the option combinations whose training would be meaningless."""
    if advantage_estimator in GROUP_ESTIMATORS and num_generations < 2:
        raise ValueError(
            f"advantage_estimator={advantage_estimator!r} needs num_generations >= 2 (its baseline comes from "
            f"the other responses of the prompt), got {num_generations}; 'reinforce_pp' and 'remax' work with 1"
        )
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if scale != "std" and advantage_estimator != "grpo":
        raise ValueError(
            f"scale={scale!r} applies to advantage_estimator='grpo' only; "
            f"{advantage_estimator!r} has its own normalisation"
        )
    if policy_loss == "gspo" and advantage_estimator in TOKEN_LEVEL_ESTIMATORS:
        raise ValueError(
            f"policy_loss='gspo' needs one advantage per sequence, but advantage_estimator="
            f"{advantage_estimator!r} gives per-token returns; use 'grpo', 'rloo' or 'remax' with GSPO"
        )


class AdvantageEstimatorMixin:
    """Mixed into :class:`~aa_lightning.algorithms.rl.grpo.GRPOModule` (reads ``advantage_estimator``,
    ``num_generations``, ``scale``, ``beta`` and the rollout helpers of the RL base module)."""

    def kl_in_reward(self) -> bool:
        """REINFORCE++ folds the KL into the per-token reward (it then needs the rollout's log-probs)."""
        return self.advantage_estimator in TOKEN_LEVEL_ESTIMATORS and self.beta != 0

    def estimate_advantages(
        self, batch: dict[str, Any], rollout: Rollout, rewards: torch.Tensor, stats: MetricAccumulator
    ) -> torch.Tensor:
        """``(B,)`` per-sequence (or ``(B, T)`` per-token, REINFORCE++) advantages of the rollout's rewards."""
        estimator, group = self.advantage_estimator, self.num_generations
        rewards = rewards.float()
        if estimator == "grpo":
            return grpo_advantages(rewards, group, self.scale)
        if estimator == "rloo":
            return rloo_advantages(rewards, group)
        if estimator == "remax":
            greedy = self.generate_rollout(batch, num_samples=1, do_sample=False)
            greedy_rewards = self.shaped_rewards(greedy, self.compute_scores(greedy)[0]).float()
            greedy_rewards = greedy_rewards + self.turn_reward_sums(greedy).float()  # multi-turn episodes
            stats.add_mean("rollout/greedy_score", greedy_rewards)
            return remax_advantages(rewards, greedy_rewards, group)
        if estimator in TOKEN_LEVEL_ESTIMATORS:
            mask = rollout.response_mask
            kl = None
            if self.kl_in_reward():
                kl = rollout["old_logprobs"].float() - rollout["ref_logprobs"].float()  # k1 per token
                stats.add_mean("rollout/kl", masked_mean(kl, mask, dim=-1))
            return reinforce_pp_advantages(
                rewards,
                mask,
                kl=kl,
                beta=self.beta,
                group_size=group if estimator == "reinforce_pp_baseline" else None,
                reduce_sum=self.reduce_sum,
            )
        raise ValueError(f"unknown advantage_estimator {estimator!r}")

    @staticmethod
    def sequence_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One number per response for logs and sample tables (the token mean of per-token advantages)."""
        return advantages if advantages.dim() == 1 else masked_mean(advantages, mask, dim=-1)
