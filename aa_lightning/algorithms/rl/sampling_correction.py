"""The gap between the rollout engine's sampling distribution and the trainer's, measured and corrected.

An engine other than the policy's own ``generate`` (vLLM) samples with its own kernels and precision, so the
log-probs it drew the tokens with differ from the ones the trainer recomputes, even with perfectly synced
weights (and by a lot when the sync is broken). ``rollout/engine_logprob_gap`` is the token mean of
``|logp_trainer - logp_engine|`` over the response tokens; ``tis_cap`` turns on truncated importance sampling
(:func:`~aa_lightning.algorithms.losses.truncated_importance_weights`) in the policy loss.
"""

from __future__ import annotations

import torch

from aa_lightning.algorithms.config import GenerationConfig
from aa_lightning.algorithms.losses import truncated_importance_weights
from aa_lightning.algorithms.rl.generation import ENGINE_LOGPROBS
from aa_lightning.algorithms.rl.metrics import MetricAccumulator
from aa_lightning.algorithms.rl.rollout import Rollout
from aa_lightning.algorithms.rl.rollout_engines.registry import engine_class

__all__ = ["SamplingCorrectionMixin", "check_tis_truncation"]


def check_tis_truncation(tis_cap: float | None, generation: GenerationConfig, allow: bool) -> None:
    """Refuse TIS with top-k/top-p sampling unless ``allow``: the engine's log-probs would not be comparable.

    vLLM reports the log-probs of the distribution it sampled from, i.e. AFTER top-k/top-p truncation
    (renormalised over the kept tokens, so each is larger than its full-vocabulary value), while the trainer's
    are temperature-only over the whole vocabulary. ``pi_trainer / pi_engine`` is then below 1 even with a
    perfect sync: TIS shrinks every token's loss and the gap metric shows that offset, not a sync error.
    """
    if tis_cap is None or allow or not generation.do_sample:
        return
    if generation.top_p < 1.0 or generation.top_k > 0:
        raise ValueError(
            f"tis_cap={tis_cap} with generation.top_p={generation.top_p} / top_k={generation.top_k}: the "
            "engine's log-probs are taken after top-k/top-p truncation, the trainer's over the full "
            "(temperature-scaled) vocabulary, so pi_trainer / pi_engine < 1 even with synced weights and TIS "
            "would shrink every token's loss. Sample with top_p: 1.0 and top_k: 0, remove tis_cap, or set "
            "tis_with_truncated_sampling: true to weight by that ratio anyway"
        )


class SamplingCorrectionMixin:
    """Mixed into :class:`~aa_lightning.algorithms.rl.module.OnlineRLModule` (reads ``tis_cap`` and
    ``rollout_engine_name``)."""

    tis_cap: float | None
    rollout_engine_name: str

    def check_sampling_correction(self) -> None:
        """TIS needs the engine's log-probs: refuse an engine that reports none before the first rollout."""
        if self.tis_cap is not None and not engine_class(self.rollout_engine_name).reports_logprobs:
            raise ValueError(
                f"tis_cap={self.tis_cap}: rollout engine {self.rollout_engine_name!r} reports no sampling "
                "log-probs to weight the tokens with (it samples with the trained weights themselves); "
                "use rollout_engine: vllm or remove tis_cap"
            )

    def log_sampling_gap(
        self, stats: MetricAccumulator, rollout: Rollout, trainer_logprobs: torch.Tensor
    ) -> None:
        """``rollout/engine_logprob_gap``: mean ``|logp_trainer - logp_engine|`` over the response tokens."""
        engine = rollout.data.get(ENGINE_LOGPROBS)
        if engine is None:
            return
        gap = (trainer_logprobs.detach().float() - engine.to(trainer_logprobs.device)).abs()
        stats.add_mean("rollout/engine_logprob_gap", gap, rollout.response_mask)

    def tis_weights(
        self, stats: MetricAccumulator, rollout: Rollout, trainer_logprobs: torch.Tensor
    ) -> torch.Tensor | None:
        """TIS weights of a minibatch (None when ``tis_cap`` is off), with their mean and capped share."""
        if self.tis_cap is None:
            return None
        engine = rollout.data.get(ENGINE_LOGPROBS)
        if engine is None:
            raise ValueError(
                f"tis_cap={self.tis_cap}: this rollout has no engine log-probs "
                f"(rollout engine {self.rollout_engine_name!r})"
            )
        weights = truncated_importance_weights(
            trainer_logprobs, engine.to(trainer_logprobs.device), self.tis_cap
        )
        mask = rollout.response_mask
        stats.add_mean("train/tis_weight", weights, mask)
        stats.add_mean("train/tis_capped_fraction", (weights >= self.tis_cap).float(), mask)
        return weights.to(trainer_logprobs.dtype)
