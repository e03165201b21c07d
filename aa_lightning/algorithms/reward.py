"""Reward and cost models: a :class:`~aa_lightning.models.ScoreModel` trained on preference pairs.

Both modules score the ``2B`` rows of a preference batch (chosen first, rejected second) in one forward and
read the score at each row's last non-pad token. Export writes the family's ``*ForSequenceClassification``
(one label, bias-free head, the tokenizer's pad id in the config), so both
``AutoModelForSequenceClassification.from_pretrained(path)`` and ``load_pretrained_models(path, score_model=True)``
(how PPO's reward, cost and critic models load) give the same scores back; families transformers has no such
class for are written as backbone + ``score_head.safetensors`` (see :mod:`aa_lightning.models.seqcls`).

The cost model is its own class (:class:`CostModule`, a subclass) rather than a loss switch on
:class:`RewardModule`: it needs inputs the reward model does not (per-response safety labels), its scores
mean the opposite (higher = worse) and it reports a different metric (sign accuracy). A separate class fails
clearly when the data lacks safety labels, and everything else (model, one forward, export) is inherited.
"""

from __future__ import annotations

from typing import Any

import torch

from aa_lightning.algorithms.losses import cost_model_loss, reward_pairwise_loss
from aa_lightning.algorithms.step_stats import StepStatsModule
from aa_lightning.batch import CHOSEN_IS_SAFE, EXTRA, MARGIN, REJECTED_IS_SAFE, model_inputs, split_pairs
from aa_lightning.models.seqcls import export_pad_token
from aa_lightning.models.unwrap import unwrap

__all__ = ["CostModule", "RewardModule"]


class RewardModule(StepStatsModule):
    """Bradley-Terry reward model: ``-log sigma(r_chosen - r_rejected - margin)`` (+ optional centring).

    Args:
        center_coef: weight of ``mean((r_chosen + r_rejected)^2)``, which keeps scores centred on 0.
        use_margin: subtract ``batch["extra"]["margin"]`` (when the data has one) inside the sigmoid.
        score_head_init_std: std of the new score head's weights (default ``1/sqrt(hidden + 1)``).
        new_score_head: start a new (random) head when ``model_name_or_path`` has no trained one, i.e. train a
            reward model from a plain language model. Off by default, so a path meant to be a trained reward
            model that is not one fails at start-up instead of training (or scoring) with a random head.
        score_head_bias: give a new head a bias. Off by default: transformers' sequence-classification heads
            have none, so only a bias-free head exports to ``AutoModelForSequenceClassification``.

    Logs ``{train,val,test}/loss``, ``accuracy`` (share of pairs with ``r_chosen > r_rejected``),
    ``chosen_score``, ``rejected_score`` and ``margin`` (``r_chosen - r_rejected``).
    """

    data_kind = "preference"
    metric_names = ("loss", "accuracy", "chosen_score", "rejected_score", "margin")

    def __init__(
        self,
        *args: Any,
        center_coef: float = 0.0,
        use_margin: bool = True,
        score_head_init_std: float | None = None,
        new_score_head: bool = False,
        score_head_bias: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        lora = self.lora
        if lora is not None and not lora.merge_on_export:
            raise ValueError(
                "a score model trained with LoRA is exported merged (PPO/Safe-RLHF load full score models): "
                "set lora.merge_on_export: true"
            )
        self.center_coef = center_coef
        self.use_margin = use_margin
        self.score_head_init_std = score_head_init_std
        self.new_score_head = new_score_head
        self.score_head_bias = score_head_bias

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model, self.tokenizer, self.processor = self.load_model(
            score_model=True,
            score_head_init_std=self.score_head_init_std,
            new_score_head=self.new_score_head,
            score_head_bias=self.score_head_bias,
        )
        self.model = self.prepare_trainable(model)

    def export_pretrained(self, save_directory: str) -> None:
        """The base export, with a pad token transformers reads our way: the export's config names the id the
        exported tokenizer pads with, and that id is never a row's last real token (:func:`export_pad_token`)."""
        tokenizer = self.tokenizer
        if tokenizer is None:
            super().export_pretrained(save_directory)
            return
        exported = export_pad_token(tokenizer)
        model = unwrap(self.export_model())
        score_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        score_model.config.get_text_config().pad_token_id = exported.pad_token_id
        self.tokenizer = exported
        try:
            super().export_pretrained(save_directory)
        finally:
            self.tokenizer = tokenizer

    def end_scores(self, batch: dict[str, Any]) -> torch.Tensor:
        """``(N,)`` float32 score of every row at its last non-pad token (left or right padding)."""
        return self.model(**model_inputs(batch, self.model)).end_scores.float()

    def compute_loss(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = split_pairs(self.end_scores(batch))
        margin = (batch.get(EXTRA) or {}).get(MARGIN) if self.use_margin else None
        out = reward_pairwise_loss(
            chosen,
            rejected,
            margin=None if margin is None else margin.to(chosen),
            center_coef=self.center_coef,
        )
        return out.loss, {
            "loss": out.loss.detach(),
            "accuracy": (out.chosen_scores > out.rejected_scores).float(),
            "chosen_score": out.chosen_scores,
            "rejected_score": out.rejected_scores,
            "margin": out.chosen_scores - out.rejected_scores,
        }

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """End scores of every row of the batch (for preference batches: chosen rows, then rejected)."""
        return self.end_scores(batch).detach().cpu()


class CostModule(RewardModule):
    """Safe-RLHF cost model: the *less safe* response of a pair gets the higher cost, unsafe ones cost > 0.

    Train it on rows whose chosen response is the *safer* one and whose ``extra`` holds ``chosen_is_safe``
    and ``rejected_is_safe`` (the ``PKU-SafeRLHF-Safety`` formatter). Loss: :func:`cost_model_loss`.

    Logs ``loss``, ``accuracy`` (share of pairs with ``cost(less safe) > cost(safer)``), ``sign_accuracy``
    (share of responses whose cost sign matches their safety label: > 0 unsafe, < 0 safe), ``safer_cost``,
    ``unsafer_cost`` and ``margin`` (``cost(less safe) - cost(safer)``).
    """

    metric_names = ("loss", "accuracy", "sign_accuracy", "safer_cost", "unsafer_cost", "margin")

    def compute_loss(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        extra = batch.get(EXTRA) or {}
        missing = [k for k in (CHOSEN_IS_SAFE, REJECTED_IS_SAFE) if k not in extra]
        if missing:
            raise ValueError(
                f"the cost model needs per-response safety labels in batch['extra'] (missing {missing}); "
                "use a formatter that sets them, e.g. template PKU-SafeRLHF-Safety (chosen = the safer response)"
            )
        safer, unsafer = split_pairs(self.end_scores(batch))
        safer_is_safe = extra[CHOSEN_IS_SAFE].to(safer.device)
        unsafer_is_safe = extra[REJECTED_IS_SAFE].to(safer.device)
        out = cost_model_loss(safer, unsafer, safer_is_safe, unsafer_is_safe)
        safer_sign = torch.where(safer_is_safe.bool(), -1.0, 1.0).to(safer)
        unsafer_sign = torch.where(unsafer_is_safe.bool(), -1.0, 1.0).to(safer)
        sign_hits = torch.cat(
            [safer_sign * out.safer_costs > 0, unsafer_sign * out.unsafer_costs > 0]
        ).float()
        return out.loss, {
            "loss": out.loss.detach(),
            "accuracy": (out.unsafer_costs > out.safer_costs).float(),
            "sign_accuracy": sign_hits,
            "safer_cost": out.safer_costs,
            "unsafer_cost": out.unsafer_costs,
            "margin": out.unsafer_costs - out.safer_costs,
        }
