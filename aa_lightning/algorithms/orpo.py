"""ORPO (Hong et al. 2024): chosen NLL + ``orpo_lambda`` x odds-ratio loss, without a reference.

Only the policy is in memory. Chosen and rejected rows are scored in ONE forward
(:class:`~aa_lightning.batch.PreferenceBatch`).
"""

from __future__ import annotations

from typing import Any

import torch

from aa_lightning.algorithms.losses import orpo_loss
from aa_lightning.algorithms.policy import PolicyModule
from aa_lightning.algorithms.step_stats import PREFERENCE_METRICS, pair_stats
from aa_lightning.algorithms.token_mean import StepTokenMean
from aa_lightning.batch import STEP_CHOSEN_LABEL_TOKENS, split_pairs

__all__ = ["ORPOModule"]


class ORPOModule(PolicyModule):
    """ORPO: the SFT loss on the chosen rows plus ``orpo_lambda`` x the odds-ratio loss of the pair.

    Args:
        orpo_lambda: weight of the odds-ratio term.

    Logs the preference statistics of :class:`~aa_lightning.algorithms.DPOModule` (rewards are
    ``orpo_lambda`` x mean log-probs), plus ``nll_loss``, ``or_loss``, ``log_odds_ratio``. The training NLL
    is a mean over every chosen token of the optimizer step, across gradient accumulation and ranks
    (:class:`~aa_lightning.algorithms.token_mean.StepTokenMean`); ``train/{loss,nll_loss,or_loss}`` are
    that step's values.
    """

    data_kind = "preference"
    metric_names = (*PREFERENCE_METRICS, "nll_loss", "or_loss", "log_odds_ratio")
    loss_type = "orpo"  # the name under the deprecated ReferenceFreeModule(loss_type=...)

    def __init__(self, *args: Any, orpo_lambda: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.orpo_lambda = orpo_lambda
        self.step_nll = StepTokenMean(STEP_CHOSEN_LABEL_TOKENS)

    def compute_loss(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = self.policy_log_probs(batch)
        chosen_mean, rejected_mean = split_pairs(policy.mean)
        chosen_sum, rejected_sum = split_pairs(policy.sum)
        # token-level NLL over all chosen tokens (the SFT loss; in training a token mean over the whole
        # optimizer step, see StepTokenMean), odds ratio on mean log-probs (< 0)
        chosen_count, _ = split_pairs(policy.token_count)
        nll_sum, tokens = -chosen_sum.sum(), chosen_count.sum()
        training = stage == "train" and self._trainer is not None
        if training:
            nll = nll_sum * self.step_nll.scale(self.trainer, batch, tokens)
        else:
            nll = nll_sum / tokens.clamp(min=1)
        out = orpo_loss(chosen_mean.clamp(max=-1e-6), rejected_mean.clamp(max=-1e-6), nll, self.orpo_lambda)
        stats = pair_stats(out.chosen_rewards, out.rejected_rewards, chosen_sum, rejected_sum, out.loss)
        stats.update(
            nll_loss=out.nll_loss.detach(), or_loss=out.or_loss.detach(), log_odds_ratio=out.log_odds_ratio
        )
        if training:
            stats.update(nll_sum=nll_sum.detach(), nll_tokens=tokens)
        return out.loss, stats

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Logs ``train/{loss,nll_loss,or_loss}`` once per optimizer step, as values of the whole step.

        (A micro-batch's NLL is only its share of the step's token mean.) The other statistics are batch means.
        """
        if self._trainer is None:
            return super().training_step(batch, batch_idx)
        loss, stats = self.compute_loss(batch, "train")
        nll_sum, tokens, or_loss = stats.pop("nll_sum"), stats.pop("nll_tokens"), stats.pop("or_loss")
        del stats["loss"], stats["nll_loss"]
        size = self.batch_size_of(batch)
        means = {f"train/{k}": v.float().mean() for k, v in stats.items() if v.numel()}
        self.log_dict(means, batch_size=size)
        step = self.step_nll.add(
            self.trainer, tokens, nll=nll_sum, or_loss=or_loss, batches=torch.ones_like(or_loss)
        )
        if step is not None:
            nll_loss = (step["nll"] / step["tokens"].clamp(min=1)).float()
            or_loss = (step["or_loss"] / step["batches"]).float()
            self.log("train/loss", nll_loss + self.orpo_lambda * or_loss, prog_bar=True, batch_size=size)
            self.log_dict({"train/nll_loss": nll_loss, "train/or_loss": or_loss}, batch_size=size)
        return loss
