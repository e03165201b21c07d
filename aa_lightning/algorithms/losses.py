"""Loss functions for preference optimisation, reward/cost modelling and RL fine-tuning.

All functions are pure: tensors in, tensors out. Every loss is returned already reduced to a scalar,
together with detached per-example quantities that are worth logging. Shapes use ``B`` for batch size,
``T`` for the number of (shifted) token positions and ``G`` for a GRPO group size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from aa_lightning.algorithms.logprobs import masked_mean, masked_sum

__all__ = [
    "CostModelLossOutput",
    "GRPOLossOutput",
    "KTOLossOutput",
    "ORPOLossOutput",
    "PolicyLossOutput",
    "PreferenceLossOutput",
    "RewardLossOutput",
    "ValueLossOutput",
    "aggregate_token_loss",
    "compute_gae",
    "cost_model_loss",
    "dpo_loss",
    "grpo_advantages",
    "grpo_loss",
    "kl_penalty",
    "kto_kl_estimate",
    "kto_loss",
    "lagrange_multiplier_loss",
    "lagrangian_advantage",
    "orpo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reward_pairwise_loss",
    "simpo_loss",
]


# --------------------------------------------------------------------------------------------------
# Output containers
# --------------------------------------------------------------------------------------------------


class PreferenceLossOutput(NamedTuple):
    loss: torch.Tensor  # () mean over the batch
    chosen_rewards: torch.Tensor  # (B,) detached implicit reward of the chosen response
    rejected_rewards: torch.Tensor  # (B,) detached implicit reward of the rejected response
    losses: torch.Tensor  # (B,) per-example losses (not detached)


class ORPOLossOutput(NamedTuple):
    loss: torch.Tensor  # () nll_loss + lambda_ * or_loss
    nll_loss: torch.Tensor  # () chosen NLL term
    or_loss: torch.Tensor  # () mean odds-ratio term (before the lambda_ weight)
    log_odds_ratio: torch.Tensor  # (B,) detached log odds(chosen) - log odds(rejected)
    chosen_rewards: torch.Tensor  # (B,) detached lambda_ * chosen mean log-prob
    rejected_rewards: torch.Tensor  # (B,) detached lambda_ * rejected mean log-prob


class KTOLossOutput(NamedTuple):
    loss: torch.Tensor  # () mean over all examples
    losses: torch.Tensor  # (B,) per-example weighted losses
    rewards: torch.Tensor  # (B,) detached beta * (policy - ref) log-ratio
    kl: torch.Tensor  # () the reference point z0 actually used


class RewardLossOutput(NamedTuple):
    loss: torch.Tensor  # ()
    accuracy: torch.Tensor  # () fraction with chosen > rejected
    chosen_scores: torch.Tensor  # (B,) detached
    rejected_scores: torch.Tensor  # (B,) detached


class CostModelLossOutput(NamedTuple):
    loss: torch.Tensor  # ()
    accuracy: torch.Tensor  # () fraction with cost(unsafer) > cost(safer)
    sign_accuracy: torch.Tensor  # () fraction of the 2B costs whose sign matches the safety label
    safer_costs: torch.Tensor  # (B,) detached
    unsafer_costs: torch.Tensor  # (B,) detached


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # ()
    clip_fraction: torch.Tensor  # () masked fraction of tokens where the clipped branch is active
    approx_kl: torch.Tensor  # () masked mean of 0.5 * (logp - old_logp)^2 (k2 estimator)


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor  # ()
    clip_fraction: torch.Tensor  # () masked fraction of tokens where the clipped value loss is larger


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor  # ()
    clip_fraction: torch.Tensor  # () masked fraction of tokens where the clipped branch is active
    kl: torch.Tensor  # () masked mean of the k3 KL to the reference (0 without reference)


# --------------------------------------------------------------------------------------------------
# Preference losses
# --------------------------------------------------------------------------------------------------


def _smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - eps) * logsigmoid(x) - eps * logsigmoid(-x)`` elementwise."""
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """Direct Preference Optimisation loss and its hinge / IPO variants.

    With ``h = (pc - rc) - (pr - rr)`` (policy/reference log-ratio margin):

    * ``"sigmoid"`` (DPO, Rafailov et al. 2023, arXiv:2305.18290):
      ``-(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h)``; ``eps = label_smoothing > 0``
      gives conservative DPO (cDPO, Mitchell 2023, https://ericmitchell.ai/cdpo.pdf).
    * ``"hinge"`` (SLiC-style, arXiv:2305.10425): ``relu(1 - beta * h)``.
    * ``"ipo"`` (IPO, Azar et al. 2023, arXiv:2310.12036): ``(h - 1 / (2 * beta))^2``. For IPO the caller
      must pass length-normalised (per-token mean) log-probs instead of sums.

    Args:
        policy_chosen_logps: ``(B,)`` policy log-prob (sum; mean for IPO) of the chosen responses.
        policy_rejected_logps: ``(B,)`` policy log-prob of the rejected responses.
        ref_chosen_logps: ``(B,)`` reference-model log-prob of the chosen responses.
        ref_rejected_logps: ``(B,)`` reference-model log-prob of the rejected responses.
        beta: inverse temperature / KL strength (IPO: regularisation ``tau``).
        loss_type: ``"sigmoid"``, ``"hinge"`` or ``"ipo"``.
        label_smoothing: cDPO flip probability ``eps`` (``"sigmoid"`` only).

    Returns:
        loss (mean over batch), ``chosen_rewards = beta * (pc - rc)``, ``rejected_rewards = beta * (pr - rr)``
        (both detached) and the per-example losses.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = _smoothed_logistic(beta * h, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected 'sigmoid', 'hinge' or 'ipo'")
    return PreferenceLossOutput(
        loss=losses.mean(),
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
        losses=losses,
    )


def simpo_loss(
    policy_chosen_logps_mean: torch.Tensor,
    policy_rejected_logps_mean: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """SimPO: reference-free, length-normalised preference loss (Meng et al. 2024, arXiv:2405.14734).

    ``loss = -(1 - eps) * log sigma(beta * c - beta * r - gamma) - eps * log sigma(-(beta * c - beta * r - gamma))``
    where ``c``/``r`` are per-token mean log-probs and ``gamma`` is the target reward margin (the
    paper's ``gamma``, not the ``gamma / beta`` ratio).

    Args:
        policy_chosen_logps_mean: ``(B,)`` length-normalised log-prob of the chosen responses.
        policy_rejected_logps_mean: ``(B,)`` length-normalised log-prob of the rejected responses.
        beta: reward scale.
        gamma: target reward margin.
        label_smoothing: label-smoothing ``eps`` as in cDPO.

    Returns:
        loss (batch mean), ``chosen_rewards = beta * c``, ``rejected_rewards = beta * r`` (detached),
        per-example losses.
    """
    chosen_rewards = beta * policy_chosen_logps_mean
    rejected_rewards = beta * policy_rejected_logps_mean
    losses = _smoothed_logistic(chosen_rewards - rejected_rewards - gamma, label_smoothing)
    return PreferenceLossOutput(
        loss=losses.mean(),
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        losses=losses,
    )


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate over the whole range (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_logps_mean: torch.Tensor,
    rejected_logps_mean: torch.Tensor,
    chosen_nll: torch.Tensor,
    lambda_: float = 0.1,
) -> ORPOLossOutput:
    """ORPO: odds-ratio preference optimisation (Hong et al. 2024, arXiv:2403.07691).

    ``log odds(y) = log p - log(1 - p)`` with ``log p`` the per-token mean log-prob (computed stably as
    ``logp - log1mexp(logp)``); ``L_OR = -log sigma(log odds(y_w) - log odds(y_l))``;
    ``loss = L_NLL + lambda_ * mean_B(L_OR)``.

    Args:
        chosen_logps_mean: ``(B,)`` mean token log-prob of chosen responses (must be < 0).
        rejected_logps_mean: ``(B,)`` mean token log-prob of rejected responses (must be < 0).
        chosen_nll: ``()`` SFT negative log-likelihood on the chosen responses (a ``(B,)`` tensor is averaged).
        lambda_: weight of the odds-ratio term.

    Returns:
        total loss, the NLL term, the (unweighted) mean odds-ratio term, the detached per-example log
        odds ratio, and detached ``lambda_ * logp`` rewards for logging.
    """
    log_odds = (chosen_logps_mean - _log1mexp(chosen_logps_mean)) - (
        rejected_logps_mean - _log1mexp(rejected_logps_mean)
    )
    or_loss = (-F.logsigmoid(log_odds)).mean()
    nll = chosen_nll.mean() if chosen_nll.dim() > 0 else chosen_nll
    return ORPOLossOutput(
        loss=nll + lambda_ * or_loss,
        nll_loss=nll,
        or_loss=or_loss,
        log_odds_ratio=log_odds.detach(),
        chosen_rewards=(lambda_ * chosen_logps_mean).detach(),
        rejected_rewards=(lambda_ * rejected_logps_mean).detach(),
    )


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO reference point ``z0 = max(0, mean_B(log pi(y'|x) - log pi_ref(y'|x)))``, detached.

    ``y'`` are mismatched completions (completion of another prompt in the batch), as in
    arXiv:2402.01306. In multi-process training average the result across processes before use.

    Args:
        policy_kl_logps: ``(B,)`` policy log-prob sums of the mismatched completions.
        ref_kl_logps: ``(B,)`` reference log-prob sums of the same completions.

    Returns:
        ``()`` detached, non-negative.
    """
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_reference: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    """Kahneman-Tversky Optimisation (Ethayarajh et al. 2024, arXiv:2402.01306).

    With ``rho = log pi(y|x) - log pi_ref(y|x)`` and ``z0 = max(kl_reference, 0)`` (detached):

    * desirable ``y``:   ``w_d * (1 - sigma(beta * (rho - z0)))``
    * undesirable ``y``: ``w_u * (1 - sigma(beta * (z0 - rho)))``

    Normalisation: ``loss = sum_i loss_i / B`` (mean over *all* examples of the batch, whatever their
    class), so batches with a single class are handled without special cases (an empty batch gives 0).

    Args:
        policy_logps: ``(B,)`` policy log-prob sums.
        ref_logps: ``(B,)`` reference log-prob sums.
        desirable: ``(B,)`` bool, True for desirable examples.
        kl_reference: ``()`` KL estimate (see :func:`kto_kl_estimate`).
        beta: reward scale.
        desirable_weight: ``w_d``.
        undesirable_weight: ``w_u``.

    Returns:
        loss, per-example losses, detached rewards ``beta * rho``, and the ``z0`` used.
    """
    z0 = torch.as_tensor(kl_reference, dtype=policy_logps.dtype, device=policy_logps.device)
    z0 = z0.detach().clamp(min=0)
    logratio = policy_logps - ref_logps
    desirable = desirable.bool()
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (logratio - z0)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - logratio)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    loss = losses.sum() / max(losses.numel(), 1)
    return KTOLossOutput(loss=loss, losses=losses, rewards=(beta * logratio).detach(), kl=z0)


# --------------------------------------------------------------------------------------------------
# Reward / cost models
# --------------------------------------------------------------------------------------------------


def reward_pairwise_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
) -> RewardLossOutput:
    """Bradley-Terry pairwise reward-model loss (Ouyang et al. 2022, arXiv:2203.02155).

    ``loss = mean_B(-log sigma(c - r - m)) + center_coef * mean_B((c + r)^2)``; the margin ``m`` follows
    Llama 2 (arXiv:2307.09288) and the centring term keeps rewards zero-centred (Eisenstein et al.,
    arXiv:2312.09244).

    Args:
        chosen_scores: ``(B,)`` scalar scores of the preferred responses.
        rejected_scores: ``(B,)`` scores of the dispreferred responses.
        margin: ``(B,)`` tensor, float, or None (0).
        center_coef: weight of the centring regulariser.

    Returns:
        loss, accuracy ``mean(c > r)``, detached chosen / rejected scores.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    loss = (-F.logsigmoid(diff)).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_scores + rejected_scores) ** 2).mean()
    accuracy = (chosen_scores > rejected_scores).float().mean()
    return RewardLossOutput(
        loss=loss,
        accuracy=accuracy.detach(),
        chosen_scores=chosen_scores.detach(),
        rejected_scores=rejected_scores.detach(),
    )


def cost_model_loss(
    safer_costs: torch.Tensor,
    unsafer_costs: torch.Tensor,
    safer_is_safe: torch.Tensor,
    unsafer_is_safe: torch.Tensor,
) -> CostModelLossOutput:
    """Safe-RLHF cost-model loss (Dai et al. 2023, arXiv:2310.12773, eq. 6).

    With sign ``s = +1`` for unsafe and ``-1`` for safe responses:
    ``loss = mean_B(-log sigma(c_u - c_s) - log sigma(s_u * c_u) - log sigma(s_s * c_s))``.

    Args:
        safer_costs: ``(B,)`` costs of the safer response of each pair.
        unsafer_costs: ``(B,)`` costs of the less safe response.
        safer_is_safe: ``(B,)`` bool safety label of the safer response.
        unsafer_is_safe: ``(B,)`` bool safety label of the less safe response.

    Returns:
        loss, accuracy ``mean(c_u > c_s)``, sign accuracy (``sign(c) == s`` over all ``2B`` responses),
        detached costs.
    """
    safer_sign = torch.where(safer_is_safe.bool(), -1.0, 1.0).to(safer_costs.dtype)
    unsafer_sign = torch.where(unsafer_is_safe.bool(), -1.0, 1.0).to(unsafer_costs.dtype)
    losses = (
        -F.logsigmoid(unsafer_costs - safer_costs)
        - F.logsigmoid(unsafer_sign * unsafer_costs)
        - F.logsigmoid(safer_sign * safer_costs)
    )
    accuracy = (unsafer_costs > safer_costs).float().mean()
    sign_hits = torch.cat([safer_sign * safer_costs > 0, unsafer_sign * unsafer_costs > 0])
    return CostModelLossOutput(
        loss=losses.mean(),
        accuracy=accuracy.detach(),
        sign_accuracy=sign_hits.float().mean().detach(),
        safer_costs=safer_costs.detach(),
        unsafer_costs=unsafer_costs.detach(),
    )


# --------------------------------------------------------------------------------------------------
# RL: KL, advantages, policy/value losses
# --------------------------------------------------------------------------------------------------


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimators of ``KL(pi || pi_ref)`` from samples of ``pi`` (Schulman, http://joschu.net/blog/kl-approx.html).

    * ``"k1"``: ``logp - logq``
    * ``"k2"``: ``0.5 * (logp - logq)^2``
    * ``"k3"``: ``exp(logq - logp) - (logq - logp) - 1`` (unbiased, always >= 0)

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the policy.
        ref_logprobs: ``(B, T)`` log-probs of the same tokens under the reference.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``(B, T)`` per-token estimates (no reduction, no masking).
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


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

    Args:
        per_token_loss: ``(B, T)``.
        mask: ``(B, T)`` bool / {0, 1} response-token mask.
        aggregation: one of the names above.
        max_completion_length: ``L`` for ``"constant"``.
    """
    if aggregation == "token_mean":
        return masked_mean(per_token_loss, mask)
    if aggregation == "sequence_mean":
        return masked_mean(per_token_loss, mask, dim=-1).mean()
    if aggregation == "constant":
        length = per_token_loss.shape[-1] if max_completion_length is None else max_completion_length
        return masked_sum(per_token_loss, mask) / (per_token_loss.shape[0] * length)
    raise ValueError(
        f"unknown aggregation {aggregation!r}; expected 'token_mean', 'sequence_mean' or 'constant'"
    )


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    aggregation: str = "token_mean",
    max_completion_length: int | None = None,
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
) -> GRPOLossOutput:
    """GRPO objective (Shao et al. 2024, arXiv:2402.03300) with DAPO / Dr. GRPO aggregations.

    Per token: ``l = -min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A) + beta * k3`` where
    ``rho = exp(logp - logp_old)`` and ``k3 = exp(logq - logp) - (logq - logp) - 1`` with ``q`` the
    reference policy. Reduced with :func:`aggregate_token_loss` (``"token_mean"``, ``"sequence_mean"``,
    ``"constant"``).

    Args:
        logprobs: ``(B, T)`` current-policy token log-probs.
        old_logprobs: ``(B, T)`` log-probs at sampling time; None means on-policy (``logprobs.detach()``).
        ref_logprobs: ``(B, T)`` reference log-probs, or None to drop the KL term.
        advantages: ``(B,)`` per-sequence advantages (``(B, T)`` also accepted).
        mask: ``(B, T)`` response-token mask.
        clip_range: lower clip ``eps``.
        beta: KL coefficient.
        aggregation: see :func:`aggregate_token_loss`.
        max_completion_length: ``L`` for ``"constant"``.
        clip_range_high: upper clip ``eps_high`` (DAPO clip-higher); defaults to ``clip_range``.

    Returns:
        loss, clip fraction, masked mean k3 KL (detached; 0 without reference).
    """
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    high = clip_range if clip_range_high is None else clip_range_high
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, estimator="k3")
        if beta:
            per_token = per_token + beta * kl
        mean_kl = masked_mean(kl.detach(), mask)
    else:
        mean_kl = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    loss = aggregate_token_loss(per_token, mask, aggregation, max_completion_length)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return GRPOLossOutput(loss=loss, clip_fraction=clip_fraction, kl=mean_kl)


# --------------------------------------------------------------------------------------------------
# Safe RLHF (PPO-Lagrangian)
# --------------------------------------------------------------------------------------------------


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
