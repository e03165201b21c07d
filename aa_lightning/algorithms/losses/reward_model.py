"""Losses that train scalar-score models: the Bradley-Terry reward model and the Safe-RLHF cost model.

Inputs are ``(B,)`` scores of the two responses of a pair; the RL modules later read these models' scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aa_lightning.algorithms.losses.outputs import CostModelLossOutput, RewardLossOutput

__all__ = ["cost_model_loss", "reward_pairwise_loss"]


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
