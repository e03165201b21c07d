"""Rows -> conversations for evaluation tasks, through the data layer's formatters.

Two ways a task config says how a row is asked: ``template`` (a registered formatter such as ``GSM8K``,
``HH-RLHF``, ``PKU-SafeRLHF``, ``MLLM-Messages``: the same names as training data) or ``prompt_format`` (a
``str.format`` text over the row's fields, e.g. ``"{question}\\nAnswer with a number."``). Rows with media
(``images``/``audios``/``videos`` columns) go through the ``MLLM-Messages`` formatter, which checks them and
writes the meta the multimodal encoder expects; nothing here knows a media layout.
"""

from __future__ import annotations

import string
from typing import Any

from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters import get_formatter
from aa_lightning.data.templating import Conversation
from aa_lightning.evaluation.task import EvalRow

MEDIA_COLUMNS = ("images", "audios", "videos")
MARKERS = {"images": "<image>", "audios": "<audio>", "videos": "<video>"}


def format_fields(row: EvalRow, text: str) -> str:
    """``text.format(**row)``; a field the text names but the row lacks is an error naming the row."""
    for _, field, _, _ in string.Formatter().parse(text):
        if field:
            row.get(field.split(".")[0].split("[")[0])
    return text.format(**row.data)


def formatted(row: EvalRow, call: Any) -> Any:
    """``call()``, a formatter error getting the row's file and number."""
    try:
        return call()
    except DataFormatError as err:
        raise err.with_location(row.source, row.number) from None


def user_turn(row: EvalRow, text: str, answer: str | None = None) -> tuple[Conversation, dict[str, Any]]:
    """One user turn (plus an assistant ``answer``), with the row's media attached by ``MLLM-Messages``."""
    media = {key: row.data[key] for key in MEDIA_COLUMNS if row.data.get(key)}
    if not media:
        conversation: Conversation = [{"role": "user", "content": text}]
        if answer is not None:
            conversation.append({"role": "assistant", "content": answer})
        return conversation, {}
    markers = "".join(
        MARKERS[key] * (len(value) if isinstance(value, list) else 1) for key, value in media.items()
    )
    messages = [{"role": "user", "content": markers + text}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    raw = {"messages": messages, **media}
    formatter = get_formatter("MLLM-Messages")
    if answer is None:
        return formatted(row, lambda: formatter.format_prompt_only_sample(raw))
    return formatted(row, lambda: formatter.format_supervised_sample(raw))


class PromptSource:
    """How a task asks a row: ``template`` (a formatter's prompt-only sample) or ``prompt_format``."""

    def __init__(self, template: str | None, prompt_format: str | None, system_prompt: str | None = None):
        if not template and not prompt_format:
            raise ValueError(
                "set `template` (a registered formatter) or `prompt_format` (a text over row fields)"
            )
        self.template, self.prompt_format, self.system_prompt = template, prompt_format, system_prompt
        self.formatter = get_formatter(template, system_prompt=system_prompt) if template else None

    def prompt(self, row: EvalRow) -> tuple[Conversation, dict[str, Any]]:
        if self.formatter is not None:
            formatter = self.formatter
            return formatted(row, lambda: formatter.format_prompt_only_sample(row.data))
        assert self.prompt_format is not None
        conversation, meta = user_turn(row, format_fields(row, self.prompt_format))
        if self.system_prompt:
            conversation = [{"role": "system", "content": self.system_prompt}, *conversation]
        return conversation, meta


def prompt_text(conversation: Conversation) -> str:
    """The last user turn's text (what the JSON records as the prompt)."""
    content = conversation[-1]["content"] if conversation else ""
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict)).strip()
    return str(content)
