"""Per-token sample estimators of ``KL(pi || pi_ref)``, shared by PPO (a reward penalty) and GRPO (a loss term).

Shapes: ``(B, T)`` with ``T`` the number of (shifted) token positions.
"""

from __future__ import annotations

import torch

__all__ = ["kl_penalty"]


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
