"""Preference losses on single responses labelled desirable or not (KTO), where no rejected twin exists.

They need a reference point estimated from mismatched completions (:func:`kto_kl_estimate`), which is why
they live apart from the pair losses of :mod:`.pairwise`.
"""

from __future__ import annotations

import torch

from aa_lightning.algorithms.losses.outputs import KTOLossOutput

__all__ = ["kto_kl_estimate", "kto_loss"]


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
