"""Multiple choice (MMLU / ARC style), by log-likelihood of each choice or by the letter a model generates.

Rows: ``{question, choices: [...], answer}`` where ``answer`` is the index of the right choice or its letter
(``"C"``); a row may carry ``images`` (image-to-text multiple choice). By log-likelihood, each choice is the
assistant turn after the question and scores ``log p(choice | question)`` over its tokens (the tokens SFT
trains on, end-of-turn included): ``accuracy`` picks the largest sum, ``accuracy_norm`` the largest mean per
token (fair to long choices). By generation, the choices are listed as ``A. ...`` and the first standalone
letter of the reply is the answer.
"""

from __future__ import annotations

import re
import string
from typing import Any

from aa_lightning.data.sources import media_root
from aa_lightning.evaluation.registry import register_task
from aa_lightning.evaluation.task import EvalContext, EvalRow, EvalTask, RowResult
from aa_lightning.evaluation.tasks.generative import GenerativeTask
from aa_lightning.evaluation.tasks.prompts import format_fields, prompt_text, user_turn

LETTERS = string.ascii_uppercase


def answer_index(row: EvalRow, field: str, count: int) -> int:
    value = row.get(field, (int, str))
    if isinstance(value, str):
        text = value.strip()
        index = LETTERS.index(text.upper()) if len(text) == 1 and text.upper() in LETTERS else None
        if index is None and text.isdigit():
            index = int(text)
        if index is None:
            raise row.error(f"expected a choice index or letter, got {value!r}", field)
    else:
        index = value
    if not 0 <= index < count:
        raise row.error(f"answer {value!r} is not one of the {count} choices", field)
    return index


def choices_of(row: EvalRow, field: str) -> list[str]:
    choices = row.get(field, list)
    if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise row.error("expected a list of at least two non-empty strings", field)
    return choices


def listed(question: str, choices: list[str]) -> str:
    return question + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def first_letter(reply: str, count: int) -> int | None:
    """The first standalone choice letter of ``reply`` (``"(B)"``, ``"B."``, ``"The answer is B"``)."""
    match = re.search(rf"\b([{LETTERS[:count]}])\b", reply)
    return LETTERS.index(match.group(1)) if match else None


@register_task("multiple_choice")
class LogLikelihoodChoice(EvalTask):
    """Multiple choice by the log-likelihood of each choice (MMLU / ARC style; see module doc).

    Args:
        prompt_format: the user turn, over the row's fields (default ``{question}``).
        list_choices: also list the choices as ``A. ...`` in the question (MMLU's prompt) and score the letters
            ``A``..``D`` instead of the choice texts.
        choices_field / answer_field: the row's choice list and right answer (index or letter).
    """

    metrics = ("accuracy", "accuracy_norm")

    def __init__(
        self,
        data: Any,
        prompt_format: str = "{question}",
        list_choices: bool = False,
        choices_field: str = "choices",
        answer_field: str = "answer",
        **kwargs: Any,
    ) -> None:
        super().__init__(data, **kwargs)
        self.prompt_format, self.list_choices = prompt_format, list_choices
        self.choices_field, self.answer_field = choices_field, answer_field

    def evaluate_batch(self, rows: list[EvalRow], context: EvalContext) -> list[RowResult]:
        model = context.pool.lm(self.model_path(context))
        conversations, metas, owners, answers = [], [], [], []
        for index, row in enumerate(rows):
            choices = choices_of(row, self.choices_field)
            answers.append(answer_index(row, self.answer_field, len(choices)))
            question = format_fields(row, self.prompt_format)
            if self.list_choices:
                question, choices = listed(question, choices), list(LETTERS[: len(choices)])
            for choice in choices:
                conversation, meta = user_turn(row, question, answer=choice)
                conversations.append(conversation)
                metas.append(meta)
                owners.append(index)
        sums, counts = model.log_likelihoods(conversations, metas, media_root=media_root(self.spec()))
        out = []
        for index in range(len(rows)):
            mine = [i for i, owner in enumerate(owners) if owner == index]
            total = [float(sums[i]) for i in mine]
            mean = [float(sums[i]) / max(int(counts[i]), 1) for i in mine]
            best, best_norm = total.index(max(total)), mean.index(max(mean))
            record = {
                "question": prompt_text(conversations[mine[0]][:-1]),
                "log_likelihoods": total,
                "predicted": best,
                "answer": answers[index],
            }
            metrics = {
                "accuracy": float(best == answers[index]),
                "accuracy_norm": float(best_norm == answers[index]),
            }
            out.append(RowResult(metrics, record))
        return out


@register_task("multiple_choice_generate")
class GeneratedChoice(GenerativeTask):
    """Multiple choice by generation: the choices listed as letters, the reply's first letter is the answer.

    Args:
        prompt_format: the question over the row's fields; the lettered choices and ``instruction`` follow.
        instruction: what the model is told after the choices.
    """

    metrics = ("accuracy", "answered")
    default_prompt_format = "{question}"

    def __init__(
        self,
        data: Any,
        instruction: str = "Answer with the letter of the correct choice.",
        choices_field: str = "choices",
        answer_field: str = "answer",
        **kwargs: Any,
    ) -> None:
        super().__init__(data, **kwargs)
        if self.prompts.template:
            raise ValueError(
                f"task {self.name}: multiple_choice_generate builds its prompt from `prompt_format` and the "
                "row's choices; it takes no `template`"
            )
        self.instruction = instruction
        self.choices_field, self.answer_field = choices_field, answer_field

    def evaluate_batch(self, rows: list[EvalRow], context: EvalContext) -> list[RowResult]:
        prompts, metas, answers, counts = [], [], [], []
        fmt = self.prompts.prompt_format or self.default_prompt_format
        for row in rows:
            choices = choices_of(row, self.choices_field)
            answers.append(answer_index(row, self.answer_field, len(choices)))
            counts.append(len(choices))
            text = listed(format_fields(row, fmt), choices) + "\n" + self.instruction
            conversation, meta = user_turn(row, text)
            if self.prompts.system_prompt:
                conversation = [{"role": "system", "content": self.prompts.system_prompt}, *conversation]
            prompts.append(conversation)
            metas.append(meta)
        replies = self.replies(rows, prompts, metas, context)
        out = []
        for prompt, reply, answer, count in zip(prompts, replies, answers, counts):
            predicted = first_letter(reply, count)
            out.append(
                RowResult(
                    {"accuracy": float(predicted == answer), "answered": float(predicted is not None)},
                    {"prompt": prompt_text(prompt), "reply": reply, "predicted": predicted, "answer": answer},
                )
            )
        return out
