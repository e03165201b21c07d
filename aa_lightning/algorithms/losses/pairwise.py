"""Preference losses on a (chosen, rejected) pair of responses to one prompt: DPO and its variants, SimPO, ORPO.

New pair losses (another DPO ``loss_type``, another reference-free objective) belong here. Inputs are
``(B,)`` sequence log-probs; outputs are :class:`~aa_lightning.algorithms.losses.outputs.PreferenceLossOutput`
(ORPO: :class:`~aa_lightning.algorithms.losses.outputs.ORPOLossOutput`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from aa_lightning.algorithms.losses.dpo_variants import VARIANT_LOSS_TYPES, variant_pair_losses
from aa_lightning.algorithms.losses.outputs import ORPOLossOutput, PreferenceLossOutput

__all__ = ["DPO_LOSS_TYPES", "dpo_loss", "orpo_loss", "simpo_loss"]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "sigmoid_norm", *VARIANT_LOSS_TYPES)
# the loss types that compare length-normalised (per-token mean) log-probs
MEAN_LOG_PROB_LOSS_TYPES = ("ipo", "sigmoid_norm")


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
    * ``"sigmoid_norm"``: the ``"sigmoid"`` formula on length-normalised (per-token mean) log-probs, which
      the caller passes (LN-DPO, the SimPO paper's length-normalised DPO, arXiv:2405.14734 sec. 4).
    * the names in :data:`~.dpo_variants.VARIANT_LOSS_TYPES` (robust, exo_pair, nca_pair, bco_pair,
      sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop): see :mod:`.dpo_variants`.

    Args:
        policy_chosen_logps: ``(B,)`` policy log-prob (sum; mean for IPO) of the chosen responses.
        policy_rejected_logps: ``(B,)`` policy log-prob of the rejected responses.
        ref_chosen_logps: ``(B,)`` reference-model log-prob of the chosen responses.
        ref_rejected_logps: ``(B,)`` reference-model log-prob of the rejected responses.
        beta: inverse temperature / KL strength (IPO: regularisation ``tau``).
        loss_type: one of :data:`DPO_LOSS_TYPES`.
        label_smoothing: cDPO flip probability ``eps`` (also robust's flip rate, EXO's and AOT's ``eps``).

    Returns:
        loss (mean over batch), ``chosen_rewards = beta * (pc - rc)``, ``rejected_rewards = beta * (pr - rr)``
        (both detached) and the per-example losses.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type in ("sigmoid", "sigmoid_norm"):
        losses = _smoothed_logistic(beta * h, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type in VARIANT_LOSS_TYPES:
        losses = variant_pair_losses(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            beta,
            loss_type,
            label_smoothing,
        )
    else:
        names = ("sigmoid", "sigmoid_norm", "hinge", "ipo", *VARIANT_LOSS_TYPES)
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {names}")
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
