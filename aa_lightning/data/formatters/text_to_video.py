"""Formatters for text-to-video rows: a prompt and the clip(s) generated for it.

The contract of :mod:`.text_to_image` with a video part: ``[{"role": "user", "content": prompt},
{"role": "assistant", "content": [{"type": "video", "video": <media item>}]}]``. The clip is a path relative
to the data file (or bytes, a ``{bytes, path}`` dict); :class:`~aa_lightning.data.text_to_video.TextToVideoEncoder`
resolves it and the datamodule decodes it when the data is prepared.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aa_lightning.data.formatters.align_anything_media import one_or_two
from aa_lightning.data.formatters.base import Conversation, Meta
from aa_lightning.data.formatters.registry import register_template
from aa_lightning.data.formatters.text_to_image import TextToImageFormatter

__all__ = ["AA_T2V", "PromptVideo", "TextToVideoFormatter"]


class TextToVideoFormatter(TextToImageFormatter):
    """Unregistered base: the text-to-image formatter with a video as the generated media."""

    media_type = "video"


@register_template("T2V-Prompt-Video")
class PromptVideo(TextToVideoFormatter):
    """``{prompt, video}`` rows (captioned clips, e.g. WebVid-style files): supervised and prompt-only."""

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        return self.with_image(self.prompt(raw_sample), self.image(raw_sample, "video")), {}


@register_template("AA_T2V")
class AA_T2V(TextToVideoFormatter):  # noqa: N801 - the name align-anything users know
    """Text-to-video preference rows ``{prompt, video_1, video_2, overall_video}``, ``overall_video`` 1 or 2
    naming the better clip: align-anything's text-to-image preference layout (``image_1``, ``image_2``,
    ``overall_image``) with videos (its documentation does not spell out a text-to-video layout). Supervised
    samples use a ``video`` column when the row has one, else the better clip.
    """

    def format_preference_sample(
        self, raw_sample: Mapping[str, Any]
    ) -> tuple[Conversation, Conversation, Meta]:
        better = one_or_two(self, raw_sample, "overall_video")
        return self.pair(raw_sample, (f"video_{better}",), (f"video_{3 - better}",))

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        self._check_row(raw_sample)
        if raw_sample.get("video") is not None:
            video = self.image(raw_sample, "video")
        else:
            video = self.image(raw_sample, f"video_{one_or_two(self, raw_sample, 'overall_video')}")
        return self.with_image(self.prompt(raw_sample), video), {}
