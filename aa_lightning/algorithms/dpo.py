"""DPO against a frozen reference: sigmoid (DPO; cDPO with ``label_smoothing``), IPO and hinge (SLiC).

One module with a ``loss_type`` switch rather than three classes: the losses share every input.
``preference_loss`` is the single override point for a custom loss (see
``notebooks/custom_preference_loss.ipynb``). The reference (live, or precomputed once and cached) comes from
:class:`~aa_lightning.algorithms.reference_cache.PrecomputedReferenceModule`. Chosen and rejected rows are
scored in ONE forward (:class:`~aa_lightning.batch.PreferenceBatch`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from aa_lightning.algorithms.losses import PreferenceLossOutput, dpo_loss
from aa_lightning.algorithms.losses.dpo_variants import combine_pair_losses, wpo_weights
from aa_lightning.algorithms.losses.pairwise import DPO_LOSS_TYPES, MEAN_LOG_PROB_LOSS_TYPES
from aa_lightning.algorithms.reference_cache import PrecomputedReferenceModule
from aa_lightning.algorithms.step_stats import PREFERENCE_METRICS, pair_stats
from aa_lightning.batch import split_pairs

__all__ = ["DPOModule"]

DPOLossType = Literal[
    "sigmoid",
    "ipo",
    "hinge",
    "sigmoid_norm",
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
]


# the loss types whose formula has an ``eps`` (label_smoothing)
SMOOTHED_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "robust", "exo_pair", "aot", "aot_unpaired")


class DPOModule(PrecomputedReferenceModule):
    """Direct Preference Optimisation against a frozen reference, with IPO / hinge / cDPO variants.

    Args:
        beta: KL strength (IPO: ``tau``).
        loss_type: ``sigmoid`` (DPO), ``ipo`` (squared loss on length-normalised log-ratios: mean
            log-probs), ``hinge`` (SLiC), ``sigmoid_norm`` (DPO on mean log-probs), or one of the variants
            of :mod:`~aa_lightning.algorithms.losses.dpo_variants` (``robust``, ``exo_pair``, ``nca_pair``,
            ``bco_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``, ``apo_down``, ``discopop``).
            A list (``[sigmoid, bco_pair]`` plus ``rpo_alpha`` is MPO, arXiv:2411.10442) sums the losses with
            ``loss_weights``; each part gets the log-probs it is defined on (sums, or means for ``ipo`` /
            ``sigmoid_norm``); the logged rewards are the first part's.
        loss_weights: one weight per ``loss_type`` entry (default: all 1).
        label_smoothing: cDPO's label-flip probability (``sigmoid``), robust DPO's flip rate, EXO's and AOT's
            ``eps`` (in a list: applied to the parts that have one).
        rpo_alpha: weight of RPO's NLL term on the chosen response (per-token mean; arXiv:2404.19733); 0: off.
        use_weighting: WPO (arXiv:2406.11827): weight each pair's loss by the policy's length-normalised
            probability of both responses (detached).
        ref_model_name_or_path: a separate reference checkpoint; default: the initial policy.
        precompute_ref_log_probs: compute the reference log-probs of every train/val sample once before
            training (cached in memory keyed by ``sample_index`` and on disk keyed by a fingerprint of the
            reference model and the encoded data), then drop the reference model: training then holds only
            the policy. A restart finds the file and recomputes nothing.
        ref_cache_dir: where the reference log-prob files go; default ``<default_root_dir>/ref_logps``.

    Logs ``{train,val}/loss``, ``rewards/{chosen,rejected,accuracies,margins}``, ``logps/{chosen,rejected}``
    (sums over response tokens). To try a new loss, subclass and override :meth:`preference_loss`.
    """

    data_kind = "preference"
    metric_names = PREFERENCE_METRICS

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        loss_type: DPOLossType | list[DPOLossType] = "sigmoid",
        label_smoothing: float = 0.0,
        loss_weights: list[float] | None = None,
        rpo_alpha: float = 0.0,
        use_weighting: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        if not names:
            raise ValueError("loss_type: give at least one loss")
        for name in names:
            if name not in DPO_LOSS_TYPES:
                raise ValueError(f"unknown loss_type {name!r}; expected one of {DPO_LOSS_TYPES}")
        if label_smoothing and not any(name in SMOOTHED_LOSS_TYPES for name in names):
            raise ValueError(f"label_smoothing applies to loss_type {SMOOTHED_LOSS_TYPES} only")
        if loss_weights is not None and len(loss_weights) != len(names):
            raise ValueError(
                f"loss_weights has {len(loss_weights)} entries for {len(names)} loss_type entries"
            )
        if rpo_alpha < 0:
            raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
        self.beta = beta
        self.loss_type = names[0]  # the part preference_loss (the override point) computes
        self.loss_types = names
        self.loss_weights = list(loss_weights) if loss_weights is not None else None
        self.label_smoothing = label_smoothing
        self.rpo_alpha = rpo_alpha
        self.use_weighting = use_weighting

    # -- the loss (override point) ---------------------------------------------------------------------
    @property
    def uses_mean_log_probs(self) -> bool:
        """IPO and sigmoid_norm compare length-normalised (per-token mean) log-ratios; the others compare sums."""
        return self.loss_type in MEAN_LOG_PROB_LOSS_TYPES

    def preference_loss(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor,
        ref_rejected_logps: torch.Tensor,
    ) -> PreferenceLossOutput:
        """``(B,)`` log-probs in, loss + implicit rewards out. Override to try another preference loss."""
        return dpo_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing if self.loss_type in SMOOTHED_LOSS_TYPES else 0.0,
        )

    @property
    def _plain(self) -> bool:
        """One loss, no weights, no RPO/WPO: today's path, bit for bit."""
        return len(self.loss_types) == 1 and not (self.loss_weights or self.rpo_alpha or self.use_weighting)

    def compute_loss(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = self.policy_log_probs(batch)
        ref_sum, ref_mean = self.reference_log_probs(batch, stage)
        if self.uses_mean_log_probs:
            policy_logps, ref_logps = policy.mean, ref_mean
        else:
            policy_logps, ref_logps = policy.sum, ref_sum
        out = self.preference_loss(*split_pairs(policy_logps), *split_pairs(ref_logps.to(policy_logps)))
        chosen_logps, rejected_logps = split_pairs(policy.sum)
        if self._plain:
            return out.loss, pair_stats(
                out.chosen_rewards, out.rejected_rewards, chosen_logps, rejected_logps, out.losses
            )
        parts = [out.losses]
        for name in self.loss_types[1:]:
            mean = name in MEAN_LOG_PROB_LOSS_TYPES
            p, r = (policy.mean, ref_mean) if mean else (policy.sum, ref_sum)
            eps = self.label_smoothing if name in SMOOTHED_LOSS_TYPES else 0.0
            part = dpo_loss(*split_pairs(p), *split_pairs(r.to(p)), self.beta, name, eps)
            parts.append(part.losses)
        chosen_mean, rejected_mean = split_pairs(policy.mean)
        losses = combine_pair_losses(
            parts,
            self.loss_weights or [1.0] * len(parts),
            wpo_weights(chosen_mean, rejected_mean) if self.use_weighting else None,
            -chosen_mean,
            self.rpo_alpha,
        )
        return losses.mean(), pair_stats(
            out.chosen_rewards, out.rejected_rewards, chosen_logps, rejected_logps, losses
        )
