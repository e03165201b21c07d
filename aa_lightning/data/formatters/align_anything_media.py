"""Formatters for align-anything's any-to-text files (text + image / audio / video -> text).

One base reads the shared layout (prompt, two responses, ``overall_response``); each registered subclass
only names its media kind and columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.base import BaseFormatter, Conversation, Meta, describe
from aa_lightning.data.formatters.multimodal_chat import KIND_KEYS
from aa_lightning.data.formatters.registry import register_template
from aa_lightning.data.media import media_item

__all__ = ["AA_TA2T", "AA_TI2T", "AA_TV2T", "AlignAnythingMedia", "one_or_two"]


def one_or_two(formatter: BaseFormatter, raw_sample: Mapping[str, Any], key: str) -> int:
    """Align-anything's "which of the two is better" column (1 or 2, also as a string) as an int."""
    value = formatter.field(raw_sample, key, kind=(int, str))
    try:
        better = int(value)
    except ValueError:
        better = 0
    if better not in (1, 2):
        raise DataFormatError(f"expected 1 or 2, got {describe(value)}", field=key)
    return better


class AlignAnythingMedia(BaseFormatter):
    """Unregistered base of align-anything's any-to-text layouts: a prompt, ``response_1``/``response_2``,
    ``overall_response`` (1 or 2: the better one) and one media column.

    Supervised rows use ``response`` when present (align-anything's SFT files), else the better response.
    Meta: the media list; preference adds ``margin`` when present; prompt-only ``{}`` + media.
    """

    kind: str = "image"
    media_columns: tuple[str, ...] = ("image",)
    prompt_keys: tuple[str, ...] = ("question", "prompt")
    strip_marker: str = ""

    def prompt_text(self, raw_sample: Mapping[str, Any]) -> str:
        self._check_row(raw_sample)
        key = next((k for k in self.prompt_keys if k in raw_sample), self.prompt_keys[0])
        text = self.field(raw_sample, key)
        if self.strip_marker:
            text = text.replace(self.strip_marker, "").strip()
            self.check(text, key)
        return text

    def media(self, raw_sample: Mapping[str, Any]) -> Meta:
        for key in self.media_columns:
            if raw_sample.get(key) is not None:
                return {KIND_KEYS[self.kind]: [media_item(raw_sample[key], key)]}
        raise DataFormatError(
            f"missing {self.kind} (the row needs {' or '.join(map(repr, self.media_columns))})",
            field=self.media_columns[0],
        )

    def prompt(self, raw_sample: Mapping[str, Any]) -> Conversation:
        parts = [{"type": self.kind}, {"type": "text", "text": self.prompt_text(raw_sample)}]
        return self.with_system([{"role": "user", "content": parts}])

    def better_id(self, raw_sample: Mapping[str, Any]) -> int:
        return one_or_two(self, raw_sample, "overall_response")

    def format_preference_sample(
        self, raw_sample: Mapping[str, Any]
    ) -> tuple[Conversation, Conversation, Meta]:
        better = self.better_id(raw_sample)
        chosen = self.field(raw_sample, f"response_{better}")
        rejected = self.field(raw_sample, f"response_{3 - better}")
        prompt = self.prompt(raw_sample)
        return (
            [*prompt, {"role": "assistant", "content": chosen}],
            [*prompt, {"role": "assistant", "content": rejected}],
            {**self.media(raw_sample), **self.preference_meta(raw_sample)},
        )

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        self._check_row(raw_sample)
        if "response" in raw_sample:
            answer = self.field(raw_sample, "response")
        else:
            answer = self.field(raw_sample, f"response_{self.better_id(raw_sample)}")
        return [*self.prompt(raw_sample), {"role": "assistant", "content": answer}], self.media(raw_sample)

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        return self.prompt(raw_sample), self.media(raw_sample)


@register_template("AA_TI2T")
class AA_TI2T(AlignAnythingMedia):  # noqa: N801 - the name align-anything users know
    """Align-Anything text+image -> text: ``{question | prompt, image, response_1, response_2,
    overall_response}`` (SFT files: ``{prompt, image, response}``). ``image`` is a path, bytes or PIL."""

    kind = "image"
    media_columns = ("image", "image_path")


@register_template("AA_TA2T")
class AA_TA2T(AlignAnythingMedia):  # noqa: N801
    """Align-Anything text+audio -> text: ``{prompt, audio_path | audio, response_1, response_2,
    overall_response}``; the audio is a path, bytes or a decoded ``{array, sampling_rate}`` dict."""

    kind = "audio"
    media_columns = ("audio_path", "audio")
    prompt_keys = ("prompt", "question")


@register_template("AA_TV2T")
class AA_TV2T(AlignAnythingMedia):  # noqa: N801
    """Align-Anything text+video -> text: ``{prompt, video_path | video, response_1, response_2,
    overall_response}``; a ``<video>`` marker in the prompt is removed (the part is added)."""

    kind = "video"
    media_columns = ("video_path", "video")
    prompt_keys = ("prompt", "question")
    strip_marker = "<video>"
