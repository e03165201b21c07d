"""Supervised fine-tuning: next-token cross-entropy on assistant tokens only."""

from __future__ import annotations

import time
from typing import Any

import torch
from torchmetrics import SumMetric

from aa_lightning.algorithms.base import AlignModule, model_inputs
from aa_lightning.algorithms.logprobs import causal_lm_log_probs, sequence_log_probs


class SFTModule(AlignModule):
    """SFT on any modality: the batch's labels mark the tokens to learn (assistant turns).

    Args:
        sparse_lm_head: run the LM head only on positions whose next token is labelled (prompt and padding
            positions skip the vocabulary projection and log-softmax: faster, less memory, same loss). Models
            whose head does not see one hidden state per input token fall back to full logits by themselves.

    Logs ``train/loss``, ``train/tokens_per_s``, ``val/loss`` and ``val/perplexity`` (token-weighted over
    the whole validation set).
    """

    data_kind = "supervised"

    def __init__(self, *args: Any, sparse_lm_head: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sparse_lm_head = sparse_lm_head
        self.val_nll = SumMetric()
        self.val_tokens = SumMetric()
        self._step_start: float | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model, self.tokenizer, self.processor = self.load_model()
        self.model = self.prepare_trainable(model)

    def token_nll(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed negative log-likelihood of the labelled tokens and their count."""
        inputs = model_inputs(batch, self.model)
        if self.sparse_lm_head:
            logps = causal_lm_log_probs(self.model, inputs, batch["labels"])
        else:
            logits = self.model(**inputs, use_cache=False).logits
            logps = sequence_log_probs(logits, batch["labels"])
        return -logps.sum.sum(), logps.token_count.sum()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        nll, tokens = self.token_nll(batch)
        loss = nll / tokens.clamp(min=1)
        self.log("train/loss", loss, prog_bar=True)
        self._tokens = batch["attention_mask"].sum()
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self._step_start is not None:
            elapsed = time.perf_counter() - self._step_start
            self.log("train/tokens_per_s", self._tokens.float() / elapsed)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        nll, tokens = self.token_nll(batch)
        self.val_nll.update(nll)
        self.val_tokens.update(tokens)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_nll.compute() / self.val_tokens.compute().clamp(min=1)
        self.log_dict({"val/loss": loss, "val/perplexity": loss.exp()}, prog_bar=True, sync_dist=False)
        self.val_nll.reset()
        self.val_tokens.reset()

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end
