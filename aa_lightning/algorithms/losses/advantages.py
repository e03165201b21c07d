"""Advantage estimators for RL fine-tuning: GAE over a value function (PPO) and group-relative baselines (GRPO).

They turn rewards into the advantages the policy losses of :mod:`.policy_gradient` weigh tokens with.
Critic-free estimators besides GRPO: RLOO's leave-one-out baseline, REINFORCE++ (with or without a group
baseline) and ReMax's greedy baseline. Shapes: ``B`` batch size, ``T`` token positions, ``G`` group size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "compute_gae",
    "discounted_returns",
    "global_normalize",
    "grpo_advantages",
    "reinforce_pp_advantages",
    "remax_advantages",
    "rloo_advantages",
]


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
    The recursion runs over the positions in ``mask`` only: ``t + 1`` is the next masked position, so the
    environment tokens between two policy turns of a multi-turn rollout (outside the mask) are stepped over,
    neither discounted nor bootstrapped from; after the last masked token the value is 0 (episode end).
    Rewards and values outside ``mask`` are ignored. Vectorised over the batch with a single reverse loop over
    time. The outputs are detached and zero outside ``mask``.

    Args:
        rewards: ``(B, T)`` per-token rewards (e.g. KL penalty plus the final score).
        values: ``(B, T)`` value estimates.
        mask: ``(B, T)`` bool / {0, 1}, True on the (policy) response tokens.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``.
    """
    keep = mask.bool()
    m = keep.to(values.dtype)
    values = values * m
    rewards = rewards * m
    seq_len = rewards.shape[1]
    advantages_reversed = []
    last_gae = torch.zeros_like(values[:, 0])
    next_values = torch.zeros_like(values[:, 0])
    for t in reversed(range(seq_len)):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        gae = delta + gamma * lam * last_gae
        advantages_reversed.append(gae)
        last_gae = torch.where(keep[:, t], gae, last_gae)  # unmasked positions carry the recursion over
        next_values = torch.where(keep[:, t], values[:, t], next_values)
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


def _grouped(rewards: torch.Tensor, group_size: int, min_size: int = 1) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries")
    if group_size < min_size:
        raise ValueError(f"this estimator needs group_size >= {min_size}, got {group_size}")
    return rewards.view(-1, group_size)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, arXiv:2402.14740; Kool et al. 2019).

    Each sample's baseline is the mean reward of the OTHER ``G - 1`` samples of its prompt:
    ``A_i = r_i - 1/(G-1) * sum_{j != i} r_j`` (equal to ``G/(G-1) * (r_i - mean_g)``); no std scaling.

    Args:
        rewards: ``(B * G,)`` scalar rewards, laid out group by group.
        group_size: ``G >= 2``.

    Returns:
        ``(B * G,)`` advantages.
    """
    grouped = _grouped(rewards, group_size, min_size=2)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


def remax_advantages(
    rewards: torch.Tensor, greedy_rewards: torch.Tensor, group_size: int = 1
) -> torch.Tensor:
    """ReMax (Li et al. 2023, arXiv:2310.10505): the baseline is the reward of the greedy response.

    ``A_i = r(x, y_i) - r(x, y_greedy(x))``: every one of the ``G`` samples of a prompt is compared with
    that prompt's greedy (argmax) decoding, which costs one extra generation per prompt and no critic.

    Args:
        rewards: ``(B * G,)`` rewards of the sampled responses, laid out group by group.
        greedy_rewards: ``(B,)`` rewards of the greedy response of each prompt.
        group_size: ``G`` samples per prompt.

    Returns:
        ``(B * G,)`` advantages.
    """
    grouped = _grouped(rewards, group_size)
    if greedy_rewards.shape != (grouped.shape[0],):
        raise ValueError(
            f"greedy_rewards must have shape ({grouped.shape[0]},), got {tuple(greedy_rewards.shape)}"
        )
    return (grouped - greedy_rewards.unsqueeze(1)).reshape(-1)


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = sum_{s >= t} gamma^(s-t) * r_s`` over response tokens (rewards outside ``mask`` count 0).

    Args:
        token_rewards: ``(B, T)`` per-token rewards.
        mask: ``(B, T)`` response-token mask.
        gamma: discount factor.

    Returns:
        ``(B, T)`` returns, zero outside ``mask``.
    """
    m = mask.to(token_rewards.dtype)
    rewards = token_rewards * m
    running = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out.append(running)
    return torch.stack(out[::-1], dim=1) * m


def global_normalize(
    values: torch.Tensor,
    mask: torch.Tensor,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``(v - mean) / sqrt(max(var, eps))`` with the mean and (population) variance over every masked token
    of the batch; ``reduce_sum`` (a sum over ranks) makes them global over all processes (REINFORCE++).

    Args:
        values: ``(B, T)``.
        mask: ``(B, T)`` response-token mask.
        reduce_sum: sums a tensor over processes (identity when None).
        eps: floor of the variance.

    Returns:
        ``(B, T)``, zero outside ``mask``.
    """
    reduce = reduce_sum or (lambda x: x)
    m = mask.to(values.dtype)
    count = reduce(m.sum()).clamp(min=1)
    mean = reduce((values * m).sum()) / count
    var = reduce((((values - mean) * m) ** 2).sum()) / count
    return (values - mean) * var.clamp(min=eps).rsqrt() * m


def reinforce_pp_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    group_size: int | None = None,
    gamma: float = 1.0,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++ (Hu et al. 2025, arXiv:2501.03262): per-token returns, normalised over the global batch.

    The KL is folded into the per-token reward: ``r_t = -beta * KL_t + [t = last] * r(x, y)`` with
    ``KL_t = log pi_old(y_t) - log pi_ref(y_t)`` (k1); the token's return is ``G_t = sum_{s>=t} gamma^(s-t) r_s``
    and its advantage ``A_t = (G_t - mean) / std`` with the mean and std over ALL response tokens of the
    batch (all ranks with ``reduce_sum``), not per prompt. With ``group_size`` (REINFORCE++-baseline) the
    score is first centred on its group's mean, ``r - mean_g(r)``, before the KL and the returns.

    Args:
        rewards: ``(B,)`` sequence scores (group by group when ``group_size`` is given).
        mask: ``(B, T)`` response-token mask; the score lands on each row's last masked token.
        kl: ``(B, T)`` per-token KL to the reference, or None (no KL term).
        beta: KL coefficient.
        group_size: ``G`` for the group baseline; None: plain REINFORCE++.
        gamma: discount factor.
        reduce_sum: sum over processes for the global normalisation.
        eps: variance floor.

    Returns:
        ``(B, T)`` advantages, zero outside ``mask``.
    """
    if rewards.dim() != 1 or rewards.shape[0] != mask.shape[0]:
        raise ValueError(f"rewards must have shape ({mask.shape[0]},), got {tuple(rewards.shape)}")
    if group_size is not None:
        grouped = _grouped(rewards, group_size, min_size=2)
        rewards = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    m = mask.bool()
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, positions, torch.full_like(positions, -1)).max(dim=1).values
    token_rewards = torch.zeros(m.shape, dtype=rewards.dtype, device=rewards.device)
    rows = torch.nonzero(last >= 0).squeeze(1)
    token_rewards[rows, last[rows]] = rewards[rows]
    if kl is not None and beta:
        token_rewards = token_rewards - beta * kl.to(rewards.dtype) * m
    returns = discounted_returns(token_rewards, m, gamma)
    return global_normalize(returns, m, reduce_sum, eps)
