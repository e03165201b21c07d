"""Supervised fine-tuning: next-token cross-entropy on assistant tokens only."""

from __future__ import annotations

import time
from typing import Any

import torch

from aa_lightning.algorithms.base import AlignModule
from aa_lightning.algorithms.eval_metrics import UniqueSampleSums, sample_indices
from aa_lightning.algorithms.logprobs import (
    SequenceLogProbs,
    explains_its_outputs,
    output_log_probs,
    sequence_log_probs,
)
from aa_lightning.algorithms.token_mean import StepTokenMean
from aa_lightning.batch import LABELS, STEP_LABEL_TOKENS, model_inputs


class SFTModule(AlignModule):
    """SFT on any modality: the batch's labels mark the tokens to learn (assistant turns).

    Args:
        sparse_lm_head: run the LM head only on positions whose next token is labelled (prompt and padding
            positions skip the vocabulary projection and log-softmax: faster, less memory, same loss). Models
            whose head does not see one hidden state per input token fall back to full logits by themselves.

    The training NLL is a mean over every labelled token of the optimizer step, across gradient
    accumulation and ranks (:class:`~aa_lightning.algorithms.token_mean.StepTokenMean`), so the gradient does
    not depend on how the step is split into micro-batches.

    Logs ``train/loss`` (that step mean, once per optimizer step), ``train/tokens_per_s``, ``val/loss`` and
    ``val/perplexity`` (token-weighted over the whole validation set, each row once on any number of ranks).
    """

    data_kind = "supervised"

    def __init__(self, *args: Any, sparse_lm_head: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sparse_lm_head = sparse_lm_head
        self.val_sums = UniqueSampleSums(["nll", "tokens"])
        self.step_nll = StepTokenMean(STEP_LABEL_TOKENS)
        self._step_start: float | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model, self.tokenizer, self.processor = self.load_model()
        self.model = self.prepare_trainable(model)

    def label_log_probs(self, batch: dict[str, Any]) -> SequenceLogProbs:
        """Per-row log-likelihood of the labelled tokens (and their counts)."""
        if self.sparse_lm_head or explains_its_outputs(self.model):
            return output_log_probs(self.model, batch)
        inputs = model_inputs(batch, self.model)
        logits = self.model(**inputs, use_cache=False).logits
        return sequence_log_probs(logits, batch[LABELS])

    def token_nll(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed negative log-likelihood of the labelled tokens and their count."""
        logps = self.label_log_probs(batch)
        return -logps.sum.sum(), logps.token_count.sum()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Returns this micro-batch's share of the step's token-mean NLL; logs the step's mean once it closes."""
        nll, tokens = self.token_nll(batch)
        self._tokens = batch["attention_mask"].sum()
        if self._trainer is None:
            return nll / tokens.clamp(min=1)
        loss = nll * self.step_nll.scale(self.trainer, batch, tokens)
        step = self.step_nll.add(self.trainer, tokens, nll=nll)
        if step is not None:
            self.log("train/loss", (step["nll"] / step["tokens"].clamp(min=1)).float(), prog_bar=True)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self._step_start is not None:
            elapsed = time.perf_counter() - self._step_start
            self.log("train/tokens_per_s", self._tokens.float() / elapsed)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logps = self.label_log_probs(batch)
        index = sample_indices(batch, logps.sum.shape[0])
        self.val_sums.update(index, {"nll": -logps.sum, "tokens": logps.token_count})

    def on_validation_epoch_end(self) -> None:
        """Token-weighted NLL over every distinct row of all ranks (rows a rank was handed twice count once)."""
        sums = self.val_sums.compute()
        with torch.inference_mode(False):  # fresh states must not be inference tensors (`trainer.validate`)
            self.val_sums.reset()
        loss = (sums["nll"] / sums["tokens"].clamp(min=1)).float()
        self.log_dict({"val/loss": loss, "val/perplexity": loss.exp()}, prog_bar=True, sync_dist=False)

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end
