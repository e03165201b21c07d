"""Advantage estimators for RL fine-tuning: GAE over a value function (PPO) and group-relative baselines (GRPO).

They turn rewards into the advantages the policy losses of :mod:`.policy_gradient` weigh tokens with.
Shapes: ``B`` batch size, ``T`` token positions, ``G`` GRPO group size.
"""

from __future__ import annotations

import torch

__all__ = ["compute_gae", "grpo_advantages"]


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2015, arXiv:1506.02438).

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``, ``R_t = A_t + V_t``.
    Rewards and values outside ``mask`` are treated as 0, so the value after the last response token
    is 0 (episode end). Vectorised over the batch with a single reverse loop over time. The outputs
    are detached and zero outside ``mask``.

    Args:
        rewards: ``(B, T)`` per-token rewards (e.g. KL penalty plus the final score).
        values: ``(B, T)`` value estimates.
        mask: ``(B, T)`` bool / {0, 1}, True on response tokens.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    seq_len = rewards.shape[1]
    advantages_reversed = []
    last_gae = torch.zeros_like(values[:, 0])
    for t in reversed(range(seq_len)):
        next_values = values[:, t + 1] if t + 1 < seq_len else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * m
    returns = advantages + values
    return advantages, returns


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024, arXiv:2402.03300).

    Rewards are laid out group by group (``G`` consecutive completions per prompt).
    ``"std"``: ``(r - mean_g) / (std_g + eps)`` with the unbiased group std (``G > 1``);
    ``"none"``: ``r - mean_g`` (mean-only, Dr. GRPO, arXiv:2503.20783).

    Args:
        rewards: ``(B * G,)`` scalar rewards.
        group_size: ``G``.
        scale: ``"std"`` or ``"none"``.
        eps: added to the std.

    Returns:
        ``(B * G,)`` advantages.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "std":
        std = grouped.std(dim=1, keepdim=True, correction=1 if group_size > 1 else 0)
        centred = centred / (std + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}; expected 'std' or 'none'")
    return centred.reshape(-1)
