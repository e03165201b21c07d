"""SimPO (Meng et al. 2024): preference optimisation on per-token mean log-probs, without a reference.

Only the policy is in memory; no reference knobs that would be silently ignored. Chosen and rejected rows
are scored in ONE forward (:class:`~aa_lightning.batch.PreferenceBatch`).
"""

from __future__ import annotations

from typing import Any

import torch

from aa_lightning.algorithms.losses import simpo_loss
from aa_lightning.algorithms.policy import PolicyModule
from aa_lightning.algorithms.step_stats import PREFERENCE_METRICS, pair_stats
from aa_lightning.batch import split_pairs

__all__ = ["SimPOModule"]


class SimPOModule(PolicyModule):
    """SimPO: ``-log sigma(beta * (c - r) - gamma)`` on the per-token mean log-probs ``c`` / ``r``.

    Args:
        beta: reward scale.
        gamma: target reward margin (in reward units: the paper's ``gamma``).
        label_smoothing: label smoothing of the sigmoid loss.

    Logs the preference statistics of :class:`~aa_lightning.algorithms.DPOModule` (rewards are ``beta`` x
    mean log-probs).
    """

    data_kind = "preference"
    metric_names = PREFERENCE_METRICS
    loss_type = "simpo"  # the name under the deprecated ReferenceFreeModule(loss_type=...)

    def __init__(
        self, *args: Any, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.beta = beta
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def compute_loss(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = self.policy_log_probs(batch)
        chosen_mean, rejected_mean = split_pairs(policy.mean)
        chosen_sum, rejected_sum = split_pairs(policy.sum)
        out = simpo_loss(chosen_mean, rejected_mean, self.beta, self.gamma, self.label_smoothing)
        return out.loss, pair_stats(
            out.chosen_rewards, out.rejected_rewards, chosen_sum, rejected_sum, out.losses
        )
