"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv:2402.04792).

Each rollout samples TWO responses per prompt in ONE ``generate`` call; the module's reward model and/or
reward functions (:meth:`compute_scores`, minus ``missing_eos_penalty`` for unfinished responses) rank them:
the higher score is *chosen*, the lower *rejected*. The pair then takes the same DPO-family loss as offline
:class:`~aa_lightning.algorithms.dpo.DPOModule`, on the policy's and the frozen reference's sequence log-probs of
the two sampled responses: ``dpo_loss(..., loss_type=loss_type)`` in one call, so every ``loss_type`` DPOModule
accepts works here unchanged (the accepted names and which of them compare length-normalised log-probs are
read from DPOModule itself).

Ties (both responses scored within ``tie_tolerance``) carry no preference: their pairs weigh 0 in the loss
(kept in the batch, so every rank runs the same forwards) and are counted in ``rollout/tie_fraction``. The
loss is the mean over the non-tied pairs of ALL ranks (each rank normalises by the global count / world size).

Log-probs use the sampling temperature (as the RL losses do): the policy being compared is the one that drew
the responses. Minibatches split the rollout by PAIRS (a pair's two rows stay together).
"""

from __future__ import annotations

from typing import Any

import torch

from aa_lightning.algorithms.dpo import DPOLossType
from aa_lightning.algorithms.losses import dpo_loss
from aa_lightning.algorithms.losses.pairwise import DPO_LOSS_TYPES, MEAN_LOG_PROB_LOSS_TYPES
from aa_lightning.algorithms.rl.metrics import MetricAccumulator
from aa_lightning.algorithms.rl.module import OnlineRLModule
from aa_lightning.algorithms.rl.rollout import Rollout
from aa_lightning.batch import PTX_STREAM

__all__ = ["OnlineDPOModule", "pair_indices"]


def pair_indices(scores: torch.Tensor, tie_tolerance: float = 0.0) -> tuple[torch.Tensor, ...]:
    """``(chosen (P,), rejected (P,), tie (P,) bool)`` row indices for the ``P = N / 2`` contiguous pairs.

    Row ``2p`` and ``2p + 1`` answer prompt ``p``; the higher score is chosen. On a tie (``|diff| <=
    tie_tolerance``) row ``2p`` is named chosen and ``tie`` is set: the caller gives that pair no weight.
    """
    pairs = scores.detach().view(-1, 2)
    second_wins = pairs[:, 1] > pairs[:, 0]
    base = torch.arange(pairs.shape[0], device=scores.device) * 2
    chosen = base + second_wins.long()
    rejected = base + (~second_wins).long()
    tie = (pairs[:, 0] - pairs[:, 1]).abs() <= tie_tolerance
    return chosen, rejected, tie


class OnlineDPOModule(OnlineRLModule):
    """Online DPO on prompt-only data: sample a pair, rank it by reward, take a DPO-family step.

    Args:
        beta: KL strength of the pair loss (IPO: ``tau``).
        loss_type: any DPO pair loss :class:`~aa_lightning.algorithms.dpo.DPOModule` accepts (``sigmoid``,
            ``ipo``, ``hinge``, ...), passed straight to ``dpo_loss``.
        label_smoothing: cDPO's label-flip probability (``sigmoid`` only).
        tie_tolerance: pairs whose two scores differ by at most this carry no preference (weight 0).
        num_iterations: passes over each rollout's pairs.
        **kwargs: see :class:`OnlineRLModule` and :class:`AlignModule`.

    Logs ``rollout/score``, ``rollout/{chosen,rejected}_score``, ``rollout/score_margin``,
    ``rollout/tie_fraction``, ``train/loss``, ``train/rewards/{chosen,rejected,margins,accuracies}`` (DPO's
    implicit rewards) and ``train/logps/{chosen,rejected}``.
    """

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        tie_tolerance: float = 0.0,
        num_iterations: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if loss_type not in DPO_LOSS_TYPES:  # DPOModule's own list: a type added there is selectable here
            raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
        if label_smoothing and loss_type != "sigmoid":
            raise ValueError("label_smoothing (cDPO) applies to loss_type 'sigmoid' only")
        if num_iterations < 1 or tie_tolerance < 0:
            raise ValueError("num_iterations must be >= 1 and tie_tolerance >= 0")
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.tie_tolerance = tie_tolerance
        self.num_iterations = num_iterations

    @property
    def uses_mean_log_probs(self) -> bool:
        """Which log-probs the loss compares: per-token means for IPO-like types (DPOModule's rule), else sums."""
        return self.loss_type in MEAN_LOG_PROB_LOSS_TYPES

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.build_actor()
        self.build_reference()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule_args = getattr(self.trainer.datamodule, "hparams", None) or {}
        if datamodule_args.get(PTX_STREAM):
            raise ValueError("Online DPO has no ptx loss: remove the ptx data stream (data.ptx) or train PPO")

    def updates_per_rollout(self) -> int:
        return self.num_iterations * super().updates_per_rollout()

    # -- the loss --------------------------------------------------------------------------------------
    def sequence_log_probs(self, token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(N,)`` sum (or per-token mean, see :attr:`uses_mean_log_probs`) of the response tokens' log-probs."""
        total = torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(dim=1)
        return total / mask.sum(dim=1).clamp(min=1) if self.uses_mean_log_probs else total

    def pair_loss(
        self,
        policy_chosen: torch.Tensor,
        policy_rejected: torch.Tensor,
        ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor,
    ) -> Any:
        """``(P,)`` log-probs in, :class:`PreferenceLossOutput` out: exactly ``dpo_loss`` with this config."""
        return dpo_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
        )

    # -- one rollout -----------------------------------------------------------------------------------
    @torch.no_grad()
    def experience(self, batch: dict[str, Any]) -> tuple[Rollout, MetricAccumulator]:
        """Sample 2 responses per prompt, score, reorder each pair as (chosen, rejected), reference log-probs."""
        stats = MetricAccumulator()
        rollout = self.generate_rollout(batch, num_samples=2)
        scores, parts = self.compute_scores(rollout)
        self.rollout_stats(stats, rollout, scores, parts)
        ranked = scores + self.turn_reward_sums(rollout)  # multi-turn: the environment's per-turn rewards too
        if self.missing_eos_penalty:
            ranked = ranked - self.missing_eos_penalty * (~rollout.has_eos).to(ranked.dtype)
        chosen, rejected, tie = pair_indices(ranked, self.tie_tolerance)
        # rows 2p / 2p + 1 become chosen / rejected of pair p, so a pair's rows stay contiguous
        order = torch.stack([chosen, rejected], dim=1).flatten()
        rollout = rollout.select(order.cpu())
        rollout["scores"] = ranked[order]
        rollout["pair_weight"] = (~tie).float().repeat_interleave(2)
        pair_scores = rollout["scores"].view(-1, 2)
        stats.add_mean("rollout/chosen_score", pair_scores[:, 0])
        stats.add_mean("rollout/rejected_score", pair_scores[:, 1])
        stats.add_mean("rollout/score_margin", pair_scores[:, 0] - pair_scores[:, 1])
        stats.add_mean("rollout/tie_fraction", tie.float())
        rollout["ref_logps"] = self.sequence_log_probs(
            self.reference_response_log_probs(rollout), rollout.response_mask
        )
        return rollout, stats

    def pair_groups(self, num_pairs: int, seed_offset: int) -> list[list[torch.Tensor]]:
        """The shared seeded minibatch split, over pairs; each pair index ``p`` expands to rows ``2p, 2p + 1``."""
        return [
            [torch.stack([2 * idx, 2 * idx + 1], dim=1).flatten() for idx in group]
            for group in self.minibatch_groups(num_pairs, seed_offset)
        ]

    def update(self, rollout: Rollout, stats: MetricAccumulator) -> None:
        """``num_iterations`` passes over the rollout's pairs, one optimizer update per accumulation group."""
        weight = rollout["pair_weight"].view(-1, 2)[:, 0]
        for p in range(self.num_iterations):
            for group in self.pair_groups(len(rollout) // 2, seed_offset=p + 1):
                # mean over the group's non-tied pairs of every rank (0 pairs: a zero loss, still a backward)
                group_pairs = self.tokens_per_rank(
                    torch.stack([weight[idx[::2] // 2].sum() for idx in group]).sum()
                )
                for i, idx in enumerate(group):
                    last = i == len(group) - 1
                    self.start_minibatch()
                    mb = rollout.select(idx)
                    logps = self.sequence_log_probs(
                        self.response_log_probs(self.model, mb)[0], mb.response_mask
                    )
                    ref = mb["ref_logps"].to(logps)
                    out = self.pair_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2])
                    w = mb["pair_weight"][0::2].to(out.losses)
                    self.log_pair_stats(stats, out, logps, w)
                    self.backward_minibatch((out.losses * w).sum() / group_pairs, last_in_group=last)
                self.optimizer_update(stats)

    def log_pair_stats(
        self, stats: MetricAccumulator, out: Any, logps: torch.Tensor, w: torch.Tensor
    ) -> None:
        """DPO's metrics over the non-tied pairs (ties have no chosen side)."""
        keep = w > 0
        chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
        stats.add_mean("train/loss", out.losses.detach(), keep)
        stats.add_mean("train/rewards/chosen", chosen, keep)
        stats.add_mean("train/rewards/rejected", rejected, keep)
        stats.add_mean("train/rewards/margins", chosen - rejected, keep)
        stats.add_mean("train/rewards/accuracies", (chosen > rejected).float(), keep)
        stats.add_mean("train/logps/chosen", logps[0::2].detach(), keep)
        stats.add_mean("train/logps/rejected", logps[1::2].detach(), keep)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        prompt_batch, ptx_batch = self.split_batch(batch)
        if ptx_batch is not None:
            raise ValueError("Online DPO has no ptx loss: remove the ptx data stream (data.ptx) or train PPO")
        rollout, stats = self.experience(prompt_batch)
        self.update(rollout, stats)
        self.log_metrics(stats, rollout, {"score": rollout["scores"], "pair_weight": rollout["pair_weight"]})
        self._rollout_index += 1
