"""Formatters for text-to-audio rows: a prompt and the audio clip(s) generated for it.

The conversation is the prompt as the user turn and the clip as the assistant turn, ``[{"role": "user",
"content": prompt}, {"role": "assistant", "content": [{"type": "audio", "audio": <media item>}]}]`` (a
preference pair: two such conversations with the same prompt). The clip is whatever the row holds (a path
relative to the data file, bytes, a ``{bytes, path}`` or ``{array, sampling_rate}`` dict), wrapped with
:func:`~aa_lightning.data.media.media_item` so an error names its column.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.align_anything_media import one_or_two
from aa_lightning.data.formatters.base import Conversation, Meta
from aa_lightning.data.formatters.registry import register_template
from aa_lightning.data.formatters.text_to_image import TextToImageFormatter
from aa_lightning.data.media import media_item

__all__ = ["AA_T2A", "PromptAudio", "TextToAudioFormatter"]


class TextToAudioFormatter(TextToImageFormatter):
    """Unregistered base: the text-to-image formatter with the clip as an ``audio`` part."""

    def image(self, raw_sample: Mapping[str, Any], *keys: str) -> dict[str, Any]:
        """The media item of the first of ``keys`` the row holds (the clip's column)."""
        self._check_row(raw_sample)
        for key in keys:
            if raw_sample.get(key) is not None:
                return media_item(raw_sample[key], key)
        raise DataFormatError(f"missing audio (the row needs {' or '.join(map(repr, keys))})", field=keys[0])

    def with_image(self, prompt: Conversation, image: dict[str, Any]) -> Conversation:
        return [*prompt, {"role": "assistant", "content": [{"type": "audio", "audio": image}]}]


@register_template("T2A-Prompt-Audio")
class PromptAudio(TextToAudioFormatter):
    """``{prompt, audio}`` rows (AudioCaps-style captioned clips): supervised and prompt-only."""

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        return self.with_image(self.prompt(raw_sample), self.image(raw_sample, "audio")), {}


@register_template("AA_T2A")
class AA_T2A(TextToAudioFormatter):  # noqa: N801 - the name align-anything users know
    """Align-Anything text-to-audio rows: ``{prompt, audio_1, audio_2, overall_audio}`` with ``overall_audio`` 1
    or 2 naming the better clip (align-anything's ``response_1/2`` + ``overall_response`` naming, as ``AA_T2I``
    uses ``image_1/2`` + ``overall_image``). Supervised samples use an ``audio`` column when the row has one,
    else the better clip.
    """

    def format_preference_sample(
        self, raw_sample: Mapping[str, Any]
    ) -> tuple[Conversation, Conversation, Meta]:
        better = one_or_two(self, raw_sample, "overall_audio")
        return self.pair(raw_sample, (f"audio_{better}",), (f"audio_{3 - better}",))

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        self._check_row(raw_sample)
        if raw_sample.get("audio") is not None:
            clip = self.image(raw_sample, "audio")
        else:
            clip = self.image(raw_sample, f"audio_{one_or_two(self, raw_sample, 'overall_audio')}")
        return self.with_image(self.prompt(raw_sample), clip), {}
