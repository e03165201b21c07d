"""The policy bases of the preference family: a trainable causal LM, optionally with a frozen reference."""

from __future__ import annotations

from typing import Any

from torch import nn

from aa_lightning.algorithms.logprobs import SequenceLogProbs, causal_lm_log_probs
from aa_lightning.algorithms.step_stats import StepStatsModule
from aa_lightning.batch import LABELS, model_inputs

__all__ = ["PolicyModule", "ReferencePolicyModule"]


class PolicyModule(StepStatsModule):
    """A causal-LM policy plus the one-forward sequence log-probs every preference method needs."""

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model, self.tokenizer, self.processor = self.load_model()
        self.model = self.prepare_trainable(model)
        self.configure_reference()

    def configure_reference(self) -> None:
        """Hook run in ``configure_model`` after the policy is built (no reference by default)."""

    def policy_log_probs(self, batch: dict[str, Any]) -> SequenceLogProbs:
        """Log-probs of every row's labelled tokens under the policy, in one forward over all rows."""
        # the LM head runs only on scored positions (prompt and padding never reach the vocabulary)
        return causal_lm_log_probs(self.model, model_inputs(batch, self.model), batch[LABELS])


class ReferencePolicyModule(PolicyModule):
    """A policy trained against a frozen reference policy (DPO, KTO).

    The reference lives in :attr:`frozen` (see :mod:`aa_lightning.algorithms.frozen`): loaded from
    ``ref_model_name_or_path`` or again from the policy's own path in ``configure_model`` (so it is sharded,
    cast and placed exactly like the policy under every strategy), or, with LoRA, the policy itself with its
    adapters switched off (no second copy of the weights).
    """

    def __init__(self, *args: Any, ref_model_name_or_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ref_model_name_or_path = ref_model_name_or_path

    def configure_reference(self) -> None:
        if "reference" not in self.frozen:
            self.setup_reference(self.ref_model_name_or_path)

    @property
    def reference_model(self) -> nn.Module | None:
        """The stored reference model (None when there is none, or when LoRA's adapters-off policy serves)."""
        return self.frozen.get("reference")

    def reference_log_probs_live(self, batch: dict[str, Any]) -> SequenceLogProbs:
        """Log-probs of the batch's labelled tokens under the reference, in one no-grad forward."""
        with self.frozen.running("reference", self.model) as ref:
            return causal_lm_log_probs(ref, model_inputs(batch, ref), batch[LABELS])
