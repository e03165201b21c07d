"""Clipped policy-gradient objectives (PPO, GRPO, GSPO, CISPO), the PPO value loss, and their token reduction.

Inputs are ``(B, T)`` token log-probs under the current, sampling-time and reference policies plus
advantages from :mod:`.advantages`; every loss is reduced with :func:`aggregate_token_loss`.
"""

from __future__ import annotations

import torch

from aa_lightning.algorithms.logprobs import masked_mean, masked_sum
from aa_lightning.algorithms.losses.kl import kl_penalty
from aa_lightning.algorithms.losses.outputs import GRPOLossOutput, PolicyLossOutput, ValueLossOutput

__all__ = [
    "aggregate_token_loss",
    "cispo_token_loss",
    "clipped_token_loss",
    "grpo_loss",
    "gspo_token_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "truncated_importance_weights",
]


def aggregate_token_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str = "token_mean",
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """Reduce a ``(B, T)`` per-token loss over response tokens.

    * ``"token_mean"``: ``sum_{b,t} m*l / sum_{b,t} m`` (all tokens of the batch weigh equally; DAPO,
      arXiv:2503.14476).
    * ``"sequence_mean"``: ``mean_b(sum_t m*l / sum_t m)`` (original GRPO, arXiv:2402.03300).
    * ``"constant"``: ``sum_{b,t} m*l / (B * L)`` with ``L = max_completion_length`` (``T`` if None;
      Dr. GRPO, arXiv:2503.20783).
    * ``"bnpo"``: ``sum_{b,t} m*l / sum_{b,t} m`` over THIS (local) batch only, as TRL's ``bnpo``: the same
      formula as ``"token_mean"`` on one batch; the difference is that a caller splitting a step into
      minibatches / ranks weighs each minibatch equally instead of by its share of the step's tokens.

    Args:
        per_token_loss: ``(B, T)``.
        mask: ``(B, T)`` bool / {0, 1} response-token mask.
        aggregation: one of the names above.
        max_completion_length: ``L`` for ``"constant"``.
    """
    if aggregation in ("token_mean", "bnpo"):
        return masked_mean(per_token_loss, mask)
    if aggregation == "sequence_mean":
        return masked_mean(per_token_loss, mask, dim=-1).mean()
    if aggregation == "constant":
        length = per_token_loss.shape[-1] if max_completion_length is None else max_completion_length
        return masked_sum(per_token_loss, mask) / (per_token_loss.shape[0] * length)
    raise ValueError(
        f"unknown aggregation {aggregation!r}; expected 'token_mean', 'sequence_mean', 'constant' or 'bnpo'"
    )


def truncated_importance_weights(
    trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance sampling weights (Yao et al. 2025, "Your efficient RL framework secretly brings
    you off-policy RL training"): ``w_t = min(exp(logp_trainer_t - logp_engine_t), cap)``, detached.

    The tokens were drawn by the rollout engine, whose numerics (kernels, precision) differ from the trainer's:
    the policy-gradient estimate is re-weighted from the engine's distribution to the trainer's, the cap
    bounding the variance of rare tokens the engine over-samples.

    Args:
        trainer_logprobs: ``(B, T)`` the trainer's rollout-time log-probs of the sampled tokens.
        engine_logprobs: ``(B, T)`` the log-probs the engine sampled them with.
        cap: ``C >= 1``.
    """
    return torch.exp(trainer_logprobs.detach() - engine_logprobs.detach()).clamp(max=cap)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    aggregation: str = "token_mean",
    max_completion_length: int | None = None,
    importance_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate objective (Schulman et al. 2017, arXiv:1707.06347).

    ``rho = exp(logp - logp_old)``; per token ``l = -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)``,
    reduced with :func:`aggregate_token_loss`. ``approx_kl`` is the k2 estimator
    ``masked_mean(0.5 * (logp - logp_old)^2)``.

    Args:
        logprobs: ``(B, T)`` current-policy log-probs of the sampled tokens.
        old_logprobs: ``(B, T)`` log-probs at sampling time.
        advantages: ``(B, T)`` per-token advantages (``(B,)`` is broadcast over tokens).
        mask: ``(B, T)`` response-token mask.
        clip_range: ``eps``.
        aggregation: ``"token_mean"``, ``"sequence_mean"`` or ``"constant"``.
        max_completion_length: used by ``"constant"``.
        importance_weights: ``(B, T)`` detached per-token weights of the surrogate (TIS,
            :func:`truncated_importance_weights`); None: 1.

    Returns:
        loss, clip fraction (tokens where the clipped branch is the active one), approx KL (detached).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    if importance_weights is not None:
        per_token = per_token * importance_weights.detach()
    loss = aggregate_token_loss(per_token, mask, aggregation, max_completion_length)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return PolicyLossOutput(loss=loss, clip_fraction=clip_fraction, approx_kl=approx_kl)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
) -> ValueLossOutput:
    """Clipped value loss used with PPO (as in OpenAI baselines / arXiv:2005.12729).

    ``v_clip = old_v + clip(v - old_v, -eps, eps)``;
    ``loss = 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2))``.

    Args:
        values: ``(B, T)`` current value predictions.
        old_values: ``(B, T)`` value predictions at rollout time.
        returns: ``(B, T)`` GAE returns.
        mask: ``(B, T)`` response-token mask.
        clip_range_value: ``eps``.

    Returns:
        loss and the masked fraction of tokens where the clipped term is the larger one.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return ValueLossOutput(loss=loss, clip_fraction=clip_fraction)


def clipped_token_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO/GRPO token-level clipped surrogate (arXiv:1707.06347, arXiv:2402.03300).

    ``rho_t = exp(logp_t - logp_old_t)``, ``l_t = -min(rho_t * A, clip(rho_t, 1 - low, 1 + high) * A)``.

    Returns:
        ``(B, T)`` per-token loss and the ``(B, T)`` bool of tokens where the clipped branch is active.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def gspo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    low: float,
    high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO (Zheng et al. 2025, arXiv:2507.18071): one importance ratio per SEQUENCE, clipped per sequence.

    ``s_i = (pi(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp(1/|y_i| * sum_t (logp_t - logp_old_t))`` (the
    geometric mean of the token ratios); ``l_i = -min(s_i * A_i, clip(s_i, 1 - low, 1 + high) * A_i)``,
    broadcast to every token of the sequence (so ``sequence_mean`` aggregation gives the paper's
    ``1/G sum_i``). The paper's clip ranges are tiny (``3e-4`` / ``4e-4``) because ``s_i`` stays near 1.

    Args:
        advantages: ``(B,)`` or ``(B, 1)``: one advantage per sequence.

    Returns:
        ``(B, T)`` per-token loss and the ``(B, T)`` bool of tokens whose sequence is clipped.
    """
    if advantages.dim() == 2 and advantages.shape[1] != 1:
        raise ValueError(
            "GSPO needs one advantage per sequence (shape (B,) or (B, 1)), got per-token advantages"
        )
    advantages = advantages.reshape(-1, 1)
    m = mask.to(logprobs.dtype)
    seq_log_ratio = ((logprobs - old_logprobs) * m).sum(dim=-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(
        min=1
    )
    ratio = torch.exp(seq_log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    per_seq = torch.maximum(unclipped, clipped)
    return per_seq.expand_as(logprobs), (clipped > unclipped).expand_as(logprobs)


def cispo_token_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1, arXiv:2506.13585): clip the importance WEIGHT, never drop a token's gradient.

    ``l_t = -sg(clip(rho_t, 1 - low, 1 + high)) * A * logp_t`` with ``sg`` stop-gradient: every token keeps
    the REINFORCE gradient ``-w_t * A * grad logp_t``, only its weight is bounded (PPO's clip zeroes the
    gradient of clipped tokens instead). The paper sets no effective lower bound (``low`` large, e.g. 1.0).

    Returns:
        ``(B, T)`` per-token loss and the ``(B, T)`` bool of tokens whose weight was clipped.
    """
    ratio = torch.exp(logprobs - old_logprobs).detach()
    weight = torch.clamp(ratio, 1.0 - low, 1.0 + high)
    return -weight * advantages * logprobs, weight != ratio


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    beta: float = 0.04,
    aggregation: str = "token_mean",
    max_completion_length: int | None = None,
    clip_range_high: float | None = None,
    policy_loss: str = "clip",
    importance_weights: torch.Tensor | None = None,
) -> GRPOLossOutput:
    """GRPO objective (Shao et al. 2024, arXiv:2402.03300) with DAPO / Dr. GRPO aggregations.

    Per token: ``l = -min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A) + beta * k3`` where
    ``rho = exp(logp - logp_old)`` and ``k3 = exp(logq - logp) - (logq - logp) - 1`` with ``q`` the
    reference policy (``policy_loss="clip"``). ``"gspo"`` replaces the token ratio by the sequence ratio of
    :func:`gspo_token_loss`, ``"cispo"`` the clipped surrogate by :func:`cispo_token_loss`. Reduced with
    :func:`aggregate_token_loss` (``"token_mean"``, ``"sequence_mean"``, ``"constant"``, ``"bnpo"``).

    Args:
        logprobs: ``(B, T)`` current-policy token log-probs.
        old_logprobs: ``(B, T)`` log-probs at sampling time; None means on-policy (``logprobs.detach()``).
        ref_logprobs: ``(B, T)`` reference log-probs, or None to drop the KL term.
        advantages: ``(B,)`` per-sequence advantages (``(B, T)`` also accepted, except by ``"gspo"``).
        mask: ``(B, T)`` response-token mask.
        clip_range: lower clip ``eps``.
        beta: KL coefficient.
        aggregation: see :func:`aggregate_token_loss`.
        max_completion_length: ``L`` for ``"constant"``.
        clip_range_high: upper clip ``eps_high`` (DAPO clip-higher); defaults to ``clip_range``.
        policy_loss: ``"clip"`` | ``"gspo"`` | ``"cispo"``.
        importance_weights: ``(B, T)`` detached per-token weights of the policy term (TIS,
            :func:`truncated_importance_weights`), not of the KL; None: 1.

    Returns:
        loss, clip fraction, masked mean k3 KL (detached; 0 without reference).
    """
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    high = clip_range if clip_range_high is None else clip_range_high
    if policy_loss == "gspo":
        per_token, was_clipped = gspo_token_loss(logprobs, old_logprobs, advantages, mask, clip_range, high)
    else:
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(-1)
        if policy_loss == "clip":
            per_token, was_clipped = clipped_token_loss(logprobs, old_logprobs, advantages, clip_range, high)
        elif policy_loss == "cispo":
            per_token, was_clipped = cispo_token_loss(logprobs, old_logprobs, advantages, clip_range, high)
        else:
            raise ValueError(f"unknown policy_loss {policy_loss!r}; expected 'clip', 'gspo' or 'cispo'")
    if importance_weights is not None:
        per_token = per_token * importance_weights.detach()
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, estimator="k3")
        if beta:
            per_token = per_token + beta * kl
        mean_kl = masked_mean(kl.detach(), mask)
    else:
        mean_kl = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    loss = aggregate_token_loss(per_token, mask, aggregation, max_completion_length)
    with torch.no_grad():
        clip_fraction = masked_mean(was_clipped.float(), mask)
    return GRPOLossOutput(loss=loss, clip_fraction=clip_fraction, kl=mean_kl)
