"""The shared part of tasks that score a model's replies: ask each row, generate (or read stored replies)."""

from __future__ import annotations

from typing import Any

from aa_lightning.data.sources import media_root
from aa_lightning.data.templating import Conversation
from aa_lightning.evaluation.task import EvalContext, EvalData, EvalRow, EvalTask
from aa_lightning.evaluation.tasks.prompts import PromptSource


class GenerativeTask(EvalTask):
    """A task whose rows are prompts answered by the model (see :class:`~aa_lightning.evaluation.task.EvalTask`).

    Args:
        template: a registered formatter whose prompt-only sample is the prompt (``GSM8K``, ``PKU-SafeRLHF``).
        prompt_format: else, the user turn as a ``str.format`` text over the row's fields.
        system_prompt: a system turn before the prompt.
        responses_field: score the replies stored in this field instead of generating (e.g. outputs of
            another system, or ``aa predict``'s file); no model is loaded then.
    """

    default_template: str | None = None
    default_prompt_format: str | None = None

    def __init__(
        self,
        data: EvalData | dict[str, Any] | str,
        template: str | None = None,
        prompt_format: str | None = None,
        system_prompt: str | None = None,
        responses_field: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(data, **kwargs)
        if template is None and prompt_format is None:
            template, prompt_format = self.default_template, self.default_prompt_format
        self.prompts = PromptSource(template, prompt_format, system_prompt)
        self.responses_field = responses_field

    def ask(self, rows: list[EvalRow]) -> tuple[list[Conversation], list[dict[str, Any]]]:
        asked = [self.prompts.prompt(row) for row in rows]
        return [c for c, _ in asked], [m for _, m in asked]

    def replies(
        self,
        rows: list[EvalRow],
        prompts: list[Conversation],
        metas: list[dict[str, Any]],
        context: EvalContext,
        model: str | None = None,
    ) -> list[str]:
        """The stored replies (``responses_field``), or those ``model`` (default: the task's) generates."""
        if self.responses_field and model is None:
            return [str(row.get(self.responses_field, str)) for row in rows]
        loaded = context.pool.lm(model or self.model_path(context))
        return loaded.generate(prompts, metas, self.settings(context), media_root=media_root(self.spec()))
