"""CPO (Xu et al. 2024): DPO's logistic loss on the policy alone, plus an SFT term on the chosen response.

Reference-free like SimPO and ORPO: only the policy is in memory. Chosen and rejected rows are scored in ONE
forward (:class:`~aa_lightning.batch.PreferenceBatch`).
"""

from __future__ import annotations

from typing import Any

import torch

from aa_lightning.algorithms.losses.dpo_variants import cpo_loss
from aa_lightning.algorithms.policy import PolicyModule
from aa_lightning.algorithms.step_stats import PREFERENCE_METRICS, pair_stats
from aa_lightning.batch import split_pairs

__all__ = ["CPOModule"]


class CPOModule(PolicyModule):
    """CPO: ``-log sigma(beta (log pi(y_w) - log pi(y_l))) + NLL(y_w)`` (arXiv:2401.08417).

    Args:
        beta: reward scale of the summed log-probs.
        label_smoothing: label smoothing of the logistic loss (as in cDPO).

    The NLL is a token mean over the batch's chosen responses. Logs the preference statistics of
    :class:`~aa_lightning.algorithms.DPOModule` (rewards are ``beta`` x summed log-probs).
    """

    data_kind = "preference"
    metric_names = PREFERENCE_METRICS

    def __init__(self, *args: Any, beta: float = 0.1, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.beta = beta
        self.label_smoothing = label_smoothing

    def compute_loss(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = self.policy_log_probs(batch)
        chosen_sum, rejected_sum = split_pairs(policy.sum)
        chosen_count, _ = split_pairs(policy.token_count)
        nll = -chosen_sum.sum() / chosen_count.sum().clamp(min=1)
        loss, losses = cpo_loss(chosen_sum, rejected_sum, nll, self.beta, self.label_smoothing)
        chosen_rewards, rejected_rewards = self.beta * chosen_sum, self.beta * rejected_sum
        return loss, pair_stats(
            chosen_rewards, rejected_rewards, chosen_sum, rejected_sum, losses + nll.detach()
        )
