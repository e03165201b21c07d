"""Formatters for single-turn instruction rows ``{instruction, input, output}`` (Alpaca and its align-anything copy)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aa_lightning.data.formatters.base import BaseFormatter, Conversation, Meta
from aa_lightning.data.formatters.registry import register_template

__all__ = ["AlignAnythingText", "Alpaca"]


@register_template("Alpaca")
class Alpaca(BaseFormatter):
    """``{instruction, input, output}`` rows (Stanford Alpaca / LLaMA-Factory ``alpaca_en_demo``).

    Prompt = ``instruction + "\\n\\n" + input`` when ``input`` is non-blank, else ``instruction``. A blank line
    (rather than align-anything's single space) keeps the instruction and its context, often a list or
    code, visually separate, matching how the Alpaca prompt template lays them out. ``input`` may be
    missing or null.

    Meta: supervised ``{}``; prompt-only ``{"reference": output}`` when ``output`` is present.
    """

    def prompt(self, raw_sample: Mapping[str, Any]) -> str:
        instruction = self.field(raw_sample, "instruction")
        extra = self.optional_field(raw_sample, "input", default="")
        return f"{instruction}\n\n{extra}" if extra.strip() else instruction

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        prompt = self.prompt(raw_sample)
        output = self.field(raw_sample, "output")
        return self.with_system(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        ), {}

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        prompt = self.prompt(raw_sample)
        output = self.optional_field(raw_sample, "output")
        meta: Meta = {"reference": output} if output else {}
        return self.with_system([{"role": "user", "content": prompt}]), meta


@register_template("AlignAnything-Text")
class AlignAnythingText(Alpaca):
    """align-anything's text SFT sample file: Alpaca columns plus ``text``, the prompt pre-rendered.

    ``text`` is ignored: it bakes in the Alpaca prompt template, while this project renders conversations
    with the model's own chat template. The file has no preference pairs, so only supervised and
    prompt-only are supported. Meta as :class:`Alpaca`.
    """
