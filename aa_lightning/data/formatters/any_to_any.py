"""Formatter for align-anything's Any2Any rows: image understanding (TU) and generation (TG) in one file.

A row says what it is with ``mode`` (align-anything's documented layout, a JSON list)::

    {"mode": "TU", "input_text": "What is in this image?", "input_image": "a.jpg", "output_text": "A train."}
    {"mode": "TG", "input_text": "Generate an image of an old train.", "output_image": "a.jpg"}

so one data set can teach a unified model (Emu3) to read images and to draw them. The conversations keep the
formatter contract of :mod:`.base`:

- TU: ``[system?, user: [{"type": "image", "image": <item>}, {"type": "text", "text": input_text}],
  assistant: output_text]`` (the image first, as Emu3-Chat's template renders it);
- TG: exactly the text-to-image conversation of :mod:`.text_to_image` (``[user: input_text, assistant:
  [{"type": "image", ...}]]``), so a TG row encodes as a ``T2I-Prompt-Image`` row does.

The meta holds ``mode``, so a batch's rows say which kind each is. ``system_prompt`` (default Emu3-Chat's
"You are a helpful assistant.") is given to TU rows only: the TG layout is Emu3's generation prompt, which has
none. A row's mistakes (an unknown mode, a TU row without ``input_image``, a TG row without ``output_image``,
a missing text) are :class:`~aa_lightning.data.errors.DataFormatError` naming the column; the data layer adds
the file and row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.base import BaseFormatter, Conversation, Meta, describe
from aa_lightning.data.formatters.registry import register_template
from aa_lightning.data.formatters.text_to_image import TextToImageFormatter

__all__ = ["ANY2ANY_MODES", "Any2Any"]

#: mode -> what it is (the error for an unknown mode lists these).
ANY2ANY_MODES = {"TU": "image + text -> text (understanding)", "TG": "text -> image (generation)"}


@register_template("Any2Any")
class Any2Any(TextToImageFormatter):
    """align-anything Any2Any rows mixing TU (``input_text``, ``input_image`` -> ``output_text``) and TG
    (``input_text`` -> ``output_image``) rows, told apart by ``mode`` (module doc). Supervised only."""

    prompt_key = "input_text"
    system_prompt = "You are a helpful assistant."  # Emu3-Chat's; TU rows only
    # a TU prompt-only row would need its image in the prompt: not offered (the text-to-image base's is)
    format_prompt_only_sample = BaseFormatter.format_prompt_only_sample

    def mode(self, raw_sample: Mapping[str, Any]) -> str:
        mode = self.field(raw_sample, "mode")
        if mode not in ANY2ANY_MODES:
            known = ", ".join(f"{name!r} ({what})" for name, what in ANY2ANY_MODES.items())
            raise DataFormatError(f"unknown mode {describe(mode)}; expected one of {known}", field="mode")
        return mode

    def understanding(self, raw_sample: Mapping[str, Any]) -> Conversation:
        question = self.field(raw_sample, "input_text")
        image = self.image(raw_sample, "input_image")
        answer = self.field(raw_sample, "output_text")
        user = {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": question}],
        }
        return self.with_system([user, {"role": "assistant", "content": answer}])

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        mode = self.mode(raw_sample)
        if mode == "TU":
            return self.understanding(raw_sample), {"mode": mode}
        return self.with_image(self.prompt(raw_sample), self.image(raw_sample, "output_image")), {
            "mode": mode
        }
