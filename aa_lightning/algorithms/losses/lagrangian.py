"""Safe RLHF's PPO-Lagrangian pieces: the reward/cost advantage mix and the dual update of the multiplier.

Kept apart from the PPO losses because they only exist for constrained (reward + cost) training.
"""

from __future__ import annotations

import torch

__all__ = ["lagrange_multiplier_loss", "lagrangian_advantage"]


def lagrangian_advantage(
    reward_adv: torch.Tensor, cost_adv: torch.Tensor, lagrange_multiplier: torch.Tensor | float
) -> torch.Tensor:
    """Combined advantage of PPO-Lagrangian (Safe-RLHF, arXiv:2310.12773, eq. 11).

    ``A = (A_r - lambda * A_c) / (1 + lambda)``; a tensor multiplier is detached.

    Args:
        reward_adv: ``(B, T)`` (or any shape) reward advantages.
        cost_adv: same shape, cost advantages.
        lagrange_multiplier: ``lambda >= 0`` (float or ``()`` tensor).
    """
    lam = (
        lagrange_multiplier.detach() if isinstance(lagrange_multiplier, torch.Tensor) else lagrange_multiplier
    )
    return (reward_adv - lam * cost_adv) / (1.0 + lam)


def lagrange_multiplier_loss(
    log_lambda: torch.Tensor, mean_episode_cost: torch.Tensor | float, cost_limit: float
) -> torch.Tensor:
    """Loss for the Lagrange multiplier ``lambda = exp(log_lambda)`` (Safe-RLHF, arXiv:2310.12773).

    ``loss = -exp(log_lambda) * (J_c - d)`` with ``J_c`` the (detached) mean episode cost and ``d`` the
    cost limit. Its gradient is ``-lambda * (J_c - d)``, so gradient *descent* raises ``lambda`` when
    ``J_c > d`` and lowers it otherwise (dual ascent on the Lagrangian).

    Args:
        log_lambda: ``()`` learnable parameter.
        mean_episode_cost: ``()`` mean cost of the current episodes.
        cost_limit: ``d``.

    Returns:
        ``()`` loss.
    """
    cost = mean_episode_cost.detach() if isinstance(mean_episode_cost, torch.Tensor) else mean_episode_cost
    return -log_lambda.exp() * (cost - cost_limit)
