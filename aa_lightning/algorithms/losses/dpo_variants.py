"""The DPO family's other pair losses, keyed by ``loss_type`` (robust, EXO, NCA, BCO, SPPO, AOT, APO, DiscoPOP).

Kept apart from :mod:`.pairwise` so that file stays readable; :func:`~.pairwise.dpo_loss` dispatches here for
every name in :data:`VARIANT_LOSS_TYPES`. Each function takes the per-pair log-ratios
``c = log pi(y_w) - log ref(y_w)`` and ``r = log pi(y_l) - log ref(y_l)`` (``(B,)``) and returns ``(B,)``
per-pair losses, so the existing sigmoid / hinge / IPO code stays untouched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["VARIANT_LOSS_TYPES", "combine_pair_losses", "cpo_loss", "variant_pair_losses", "wpo_weights"]

# defaults the papers use where a loss has its own constant
EXO_EPSILON = 1e-3  # EXO's label-smoothing epsilon when label_smoothing is 0 (log(0) is undefined)
DISCOPOP_TAU = 0.05  # DiscoPOP's modulation temperature (Lu et al. 2024, sec. 5)


def robust_losses(c: torch.Tensor, r: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """rDPO (Chowdhury et al. 2024, arXiv:2403.00409, eq. 8): unbiased under label flips of rate ``eps``.

    ``[(1 - eps) * -log sigma(beta h) - eps * -log sigma(-beta h)] / (1 - 2 eps)``, ``h = c - r``.
    """
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
    z = beta * (c - r)
    return ((1.0 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def exo_pair_losses(c: torch.Tensor, r: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """EXO (Ji et al. 2024, arXiv:2402.00856, eq. 13 with K = 2): reverse KL to the smoothed preference.

    ``sigma(z) * (log sigma(z) - log(1 - eps)) + sigma(-z) * (log sigma(-z) - log eps)``, ``z = beta (c - r)``;
    ``eps`` defaults to 1e-3 (the paper's label smoothing) when ``label_smoothing`` is 0.
    """
    eps = eps or EXO_EPSILON
    z = beta * (c - r)
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1.0 - eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def nca_pair_losses(c: torch.Tensor, r: torch.Tensor, beta: float) -> torch.Tensor:
    """NCA (Chen et al. 2024, arXiv:2402.05369, eq. 11 with K = 2): absolute likelihoods, not only the margin.

    ``-log sigma(beta c) - 1/2 log sigma(-beta c) - 1/2 log sigma(-beta r)``.
    """
    return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)


def bco_pair_losses(
    c: torch.Tensor, r: torch.Tensor, beta: float, delta: torch.Tensor | None
) -> torch.Tensor:
    """BCO (Jung et al. 2024, arXiv:2404.04656, eq. 9 on pairs): a binary classifier with reward shift ``delta``.

    ``-log sigma(beta c - delta) - log sigma(-(beta r - delta))``; the paper's ``delta`` is the mean reward
    (a running mean there; here the detached batch mean of ``beta c`` and ``beta r`` unless given).
    """
    if delta is None:
        delta = torch.cat([beta * c, beta * r]).mean().detach()
    return -F.logsigmoid(beta * c - delta) - F.logsigmoid(-(beta * r - delta))


def sppo_hard_losses(c: torch.Tensor, r: torch.Tensor, beta: float) -> torch.Tensor:
    """SPPO with hard labels (Wu et al. 2024, arXiv:2405.00675, eq. 4.4, P(y_w > y_l) = 1, eta = 1/beta).

    ``(c - 1/(2 beta))^2 + (r + 1/(2 beta))^2``: each log-ratio regressed to ``eta (P - 1/2)``.
    """
    return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2


def _smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    """cDPO's smoothed logistic loss ``-(1 - eps) log sigma(z) - eps log sigma(-z)``."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def aot_losses(
    policy_margin: torch.Tensor, ref_margin: torch.Tensor, beta: float, eps: float
) -> torch.Tensor:
    """AOT (Melnyk et al. 2024, arXiv:2406.05882): first-order stochastic dominance via sorted batches.

    The 1-D optimal transport plan between two empirical distributions matches their sorted values, so the
    logistic loss is applied to quantile differences: ``z = beta (sort(a) - sort(b))``, loss
    ``-(1 - eps) log sigma(z) - eps log sigma(-z)``. Paired (``aot``): ``a`` the policy's margins
    ``log pi(y_w) - log pi(y_l)``, ``b`` the reference's. Unpaired (``aot_unpaired``): ``a`` the chosen
    log-ratios ``c``, ``b`` the rejected ones ``r``. With one pair per batch both are DPO.
    """
    return _smoothed(beta * (torch.sort(policy_margin).values - torch.sort(ref_margin).values), eps)


def apo_zero_losses(c: torch.Tensor, r: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 5): raise chosen, lower rejected likelihood.

    ``(1 - sigma(beta c)) + sigma(beta r)``: for outputs better than the model's own.
    """
    return (1.0 - torch.sigmoid(beta * c)) + torch.sigmoid(beta * r)


def apo_down_losses(c: torch.Tensor, r: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 6): lower both, rejected more.

    ``sigma(beta c) + (1 - sigma(beta (c - r)))``: for outputs worse than the model's own.
    """
    return torch.sigmoid(beta * c) + (1.0 - torch.sigmoid(beta * (c - r)))


def discopop_losses(c: torch.Tensor, r: torch.Tensor, beta: float, tau: float = DISCOPOP_TAU) -> torch.Tensor:
    """DiscoPOP / LRML (Lu et al. 2024, arXiv:2406.08414, eq. 6): logistic and exponential losses blended.

    ``rho = beta (c - r)``, ``w = sigma(rho / tau)``: ``(1 - w) * -log sigma(rho) + w * exp(-rho)``.
    """
    rho = beta * (c - r)
    w = torch.sigmoid(rho / tau)
    return (1.0 - w) * -F.logsigmoid(rho) + w * torch.exp(-rho)


VARIANT_LOSS_TYPES = (
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
)


def variant_pair_losses(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``(B,)`` per-pair losses of one of :data:`VARIANT_LOSS_TYPES` (formulas on each function above)."""
    c = policy_chosen_logps - ref_chosen_logps
    r = policy_rejected_logps - ref_rejected_logps
    if loss_type == "robust":
        return robust_losses(c, r, beta, label_smoothing)
    if loss_type == "exo_pair":
        return exo_pair_losses(c, r, beta, label_smoothing)
    if loss_type == "nca_pair":
        return nca_pair_losses(c, r, beta)
    if loss_type == "bco_pair":
        return bco_pair_losses(c, r, beta, None)
    if loss_type == "sppo_hard":
        return sppo_hard_losses(c, r, beta)
    if loss_type == "aot":
        policy_margin = policy_chosen_logps - policy_rejected_logps
        return aot_losses(policy_margin, ref_chosen_logps - ref_rejected_logps, beta, label_smoothing)
    if loss_type == "aot_unpaired":
        return aot_losses(c, r, beta, label_smoothing)
    if loss_type == "apo_zero":
        return apo_zero_losses(c, r, beta)
    if loss_type == "apo_down":
        return apo_down_losses(c, r, beta)
    if loss_type == "discopop":
        return discopop_losses(c, r, beta)
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {VARIANT_LOSS_TYPES}")


def wpo_weights(
    policy_chosen_logps_mean: torch.Tensor, policy_rejected_logps_mean: torch.Tensor
) -> torch.Tensor:
    """WPO's pair weight (Zhou et al. 2024, arXiv:2406.11827, eq. 4): how likely the policy is to sample the pair.

    ``w = exp(mean_t log pi(y_w,t) + mean_t log pi(y_l,t))`` (length-normalised probabilities of both
    responses), detached: off-policy pairs count less, so the data looks closer to on-policy.
    """
    return torch.exp(policy_chosen_logps_mean + policy_rejected_logps_mean).detach()


def combine_pair_losses(
    losses: list[torch.Tensor],
    weights: list[float],
    pair_weights: torch.Tensor | None = None,
    chosen_nll: torch.Tensor | None = None,
    rpo_alpha: float = 0.0,
) -> torch.Tensor:
    """``(B,)`` per-pair objective: ``w_i * sum_k lambda_k l_k,i + alpha * nll_i``.

    ``l_k`` are the per-pair losses of several loss types with weights ``lambda_k`` (MPO's mixture,
    arXiv:2411.10442), ``w_i`` WPO's pair weights (:func:`wpo_weights`) and ``nll_i`` the chosen response's
    per-token NLL weighted by ``alpha`` (RPO, Pang et al. 2024, arXiv:2404.19733, eq. 1:
    ``L_DPO + alpha * (-log pi(y_w | x) / |y_w|)``).
    """
    if len(losses) != len(weights):
        raise ValueError(f"{len(losses)} losses but {len(weights)} loss_weights")
    total = sum(w * part for w, part in zip(weights, losses))
    if pair_weights is not None:
        total = total * pair_weights
    if rpo_alpha:
        if chosen_nll is None:
            raise ValueError("rpo_alpha needs the chosen responses' NLL")
        total = total + rpo_alpha * chosen_nll
    return total


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPO (Xu et al. 2024, arXiv:2401.08417, eq. 5): DPO with the reference dropped, plus the chosen NLL.

    ``L = mean_B[-(1 - eps) log sigma(beta (pw - pl)) - eps log sigma(-beta (pw - pl))] + L_NLL``, ``pw`` / ``pl``
    the summed log-probs of the chosen / rejected responses and ``L_NLL = -log pi(y_w)`` per token.

    Returns:
        the total loss and the ``(B,)`` per-pair preference losses.
    """
    losses = _smoothed(beta * (policy_chosen_logps - policy_rejected_logps), label_smoothing)
    return losses.mean() + chosen_nll, losses
