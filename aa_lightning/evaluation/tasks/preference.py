"""Preference accuracy on held-out pairs: does a reward model, a cost model or a DPO policy rank them right?

Pairs come from a registered preference formatter (``HH-RLHF``, ``PKU-SafeRLHF``, ``PKU-SafeRLHF-Safety``,
``UltraFeedback`` ...), the same as training rows. The scorers:

- ``reward``: ``r(chosen) > r(rejected)`` under ``reward_model``;
- ``cost``: ``c(chosen) < c(rejected)`` under ``cost_model`` (pair it with ``PKU-SafeRLHF-Safety``, whose
  chosen is the safer reply);
- ``dpo``: the implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` of the policy (the run's ``model``)
  against ``reference_model``: ``r(chosen) > r(rejected)``, i.e. DPO's reward accuracy. ``y`` is the final
  reply only (earlier turns are the prompt ``x``), so each row's recorded scores are the response's.

Metrics: ``accuracy`` (a tie counts as wrong) and ``margin`` (mean of better minus worse score).
"""

from __future__ import annotations

from typing import Any, Literal

from aa_lightning.data.formatters import get_formatter
from aa_lightning.data.sources import media_root
from aa_lightning.evaluation.registry import register_task
from aa_lightning.evaluation.task import EvalContext, EvalRow, EvalTask, RowResult
from aa_lightning.evaluation.tasks.prompts import formatted, prompt_text


@register_task("preference_accuracy")
class PreferenceAccuracy(EvalTask):
    """Accuracy of a reward model, a cost model or a DPO policy's implicit reward on preference pairs.

    Args:
        template: the preference formatter of the rows (``HH-RLHF``, ``PKU-SafeRLHF``, ...).
        scorer: ``reward``, ``cost`` or ``dpo`` (see module doc).
        reward_model / cost_model: the score model for ``reward`` / ``cost``.
        reference_model: the reference policy for ``dpo``.
        beta: DPO's beta (scales the margin only; the accuracy does not depend on it).
    """

    metrics = ("accuracy", "margin")

    def __init__(
        self,
        data: Any,
        template: str = "HH-RLHF",
        scorer: Literal["reward", "cost", "dpo"] = "reward",
        reward_model: str | None = None,
        cost_model: str | None = None,
        reference_model: str | None = None,
        beta: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(data, **kwargs)
        needed = {"reward": reward_model, "cost": cost_model, "dpo": reference_model}
        if scorer not in needed:
            raise ValueError(f"task {self.name}: scorer must be reward, cost or dpo, got {scorer!r}")
        if not needed[scorer]:
            missing = {"reward": "reward_model", "cost": "cost_model", "dpo": "reference_model"}[scorer]
            raise ValueError(f"task {self.name}: scorer {scorer!r} needs `{missing}`")
        self.formatter = get_formatter(template)
        self.scorer, self.beta = scorer, beta
        self.reward_model, self.cost_model, self.reference_model = reward_model, cost_model, reference_model

    def pair_scores(
        self, chosen: list, rejected: list, metas: list, context: EvalContext
    ) -> tuple[list, list]:
        root = media_root(self.spec())
        both, both_metas = chosen + rejected, metas + metas
        if self.scorer in ("reward", "cost"):
            path = self.reward_model if self.scorer == "reward" else self.cost_model
            assert path is not None
            scores = context.pool.score(path).scores(both, both_metas, media_root=root).tolist()
        else:
            assert self.reference_model is not None
            # log pi(y|x) of the final reply y only: earlier turns of a multi-turn row are the prompt x
            policy, _ = context.pool.lm(self.model_path(context)).log_likelihoods(
                both, both_metas, root, train_on="last_assistant"
            )
            reference, _ = context.pool.lm(self.reference_model).log_likelihoods(
                both, both_metas, root, train_on="last_assistant"
            )
            scores = (self.beta * (policy - reference)).tolist()
        n = len(chosen)
        return scores[:n], scores[n:]

    def evaluate_batch(self, rows: list[EvalRow], context: EvalContext) -> list[RowResult]:
        pairs = [
            formatted(row, lambda row=row: self.formatter.format_preference_sample(row.data)) for row in rows
        ]
        chosen, rejected, metas = [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs]
        good, bad = self.pair_scores(chosen, rejected, metas, context)
        sign = -1.0 if self.scorer == "cost" else 1.0  # a lower cost is better
        out = []
        for conversation, g, b in zip(chosen, good, bad):
            margin = sign * (g - b)
            record = {"prompt": prompt_text(conversation[:-1]), "chosen_score": g, "rejected_score": b}
            out.append(RowResult({"accuracy": float(margin > 0), "margin": margin}, record))
        return out
