"""Formatters for text-to-image rows: a prompt and the image(s) generated for it.

A text-to-image sample keeps the formatter contract of :mod:`.base`: the conversation is the prompt as the
user turn and the image as the assistant turn, ``[{"role": "user", "content": prompt}, {"role": "assistant",
"content": [{"type": "image", "image": <media item>}]}]`` (a preference pair: two such conversations with
the same prompt). The image is whatever the row holds (a path relative to the data file, bytes, a
``{bytes, path}`` dict, a PIL image), wrapped with :func:`~aa_lightning.data.media.media_item` so an error
names its column; :class:`~aa_lightning.data.text_to_image.TextToImageEncoder` resolves and checks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aa_lightning.batch import DESIRABLE
from aa_lightning.data.errors import DataFormatError, LeftOutRow
from aa_lightning.data.formatters.align_anything_media import one_or_two
from aa_lightning.data.formatters.base import BaseFormatter, Conversation, Meta, describe
from aa_lightning.data.formatters.registry import register_template
from aa_lightning.data.media import media_item

__all__ = ["AA_T2I", "PickAPic", "PromptImage", "PromptImageLabel", "TextToImageFormatter"]


class TextToImageFormatter(BaseFormatter):
    """Unregistered base: reads the prompt and image columns and builds the conversations (module doc).

    ``media_type`` is the kind of the generated media (the content part's ``type``): ``image`` here, ``video``
    for the text-to-video formatters (:mod:`.text_to_video`), which share everything else.
    """

    prompt_key: str = "prompt"
    media_type: str = "image"

    def prompt(self, raw_sample: Mapping[str, Any]) -> Conversation:
        return [{"role": "user", "content": self.field(raw_sample, self.prompt_key)}]

    def image(self, raw_sample: Mapping[str, Any], *keys: str) -> dict[str, Any]:
        """The media item of the first of ``keys`` the row holds (alternative spellings of one column)."""
        self._check_row(raw_sample)
        for key in keys:
            if raw_sample.get(key) is not None:
                return media_item(raw_sample[key], key)
        raise DataFormatError(
            f"missing {self.media_type} (the row needs {' or '.join(map(repr, keys))})", field=keys[0]
        )

    def with_image(self, prompt: Conversation, image: dict[str, Any]) -> Conversation:
        kind = self.media_type
        return [*prompt, {"role": "assistant", "content": [{"type": kind, kind: image}]}]

    def pair(
        self, raw_sample: Mapping[str, Any], chosen: tuple[str, ...], rejected: tuple[str, ...]
    ) -> tuple[Conversation, Conversation, Meta]:
        """The preference sample whose images are in the columns ``chosen`` and ``rejected``."""
        prompt = self.prompt(raw_sample)
        return (
            self.with_image(prompt, self.image(raw_sample, *chosen)),
            self.with_image(prompt, self.image(raw_sample, *rejected)),
            self.preference_meta(raw_sample),
        )

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        return self.prompt(raw_sample), {}


@register_template("T2I-Prompt-Image")
class PromptImage(TextToImageFormatter):
    """``{prompt, image}`` rows (DiffusionDB and most captioned image sets): supervised and prompt-only."""

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        return self.with_image(self.prompt(raw_sample), self.image(raw_sample, "image")), {}


@register_template("T2I-Unpaired")
class PromptImageLabel(TextToImageFormatter):
    """Unpaired likes and dislikes ``{prompt, image, label}`` (Diffusion-KTO's data, arXiv:2404.04465):
    ``label`` is a JSON boolean, true for a desirable image. Supervised samples with meta ``desirable``."""

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        desirable = self.field(raw_sample, "label", kind=bool)
        return self.with_image(self.prompt(raw_sample), self.image(raw_sample, "image")), {
            DESIRABLE: desirable
        }


@register_template("Pick-a-Pic")
class PickAPic(TextToImageFormatter):
    """Pick-a-Pic rows: ``{caption, jpg_0, jpg_1, label_0}`` (the released parquet files hold the images as
    bytes in ``jpg_*``; ``image_0``/``image_1`` paths work too). ``label_0`` is 1 when image 0 is preferred,
    0 when image 1 is, and 0.5 for a tie: such rows carry no preference, so they are left out and counted
    (:class:`~aa_lightning.data.errors.LeftOutRow`), as align-anything's ``check_equal`` drops them.
    Supervised samples train on the preferred image.
    """

    prompt_key = "caption"

    def preferred(self, raw_sample: Mapping[str, Any]) -> int:
        """0 or 1: the index of the preferred image."""
        label = self.field(raw_sample, "label_0", kind=(int, float))
        if label == 0.5:
            raise LeftOutRow("ties (label_0 is 0.5)")
        if label not in (0, 1):
            raise DataFormatError(
                f"expected 1 (image 0 preferred), 0 (image 1 preferred) or 0.5 (a tie), got {describe(label)}",
                field="label_0",
            )
        other = self.optional_field(raw_sample, "label_1", kind=(int, float))
        if other is not None and label + other != 1:
            raise DataFormatError(
                f"label_0 is {label} but label_1 is {other}: they must sum to 1", field="label_1"
            )
        return 0 if label == 1 else 1

    @staticmethod
    def columns(index: int) -> tuple[str, str]:
        return f"jpg_{index}", f"image_{index}"

    def format_preference_sample(
        self, raw_sample: Mapping[str, Any]
    ) -> tuple[Conversation, Conversation, Meta]:
        better = self.preferred(raw_sample)
        return self.pair(raw_sample, self.columns(better), self.columns(1 - better))

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        image = self.image(raw_sample, *self.columns(self.preferred(raw_sample)))
        return self.with_image(self.prompt(raw_sample), image), {}


@register_template("AA_T2I")
class AA_T2I(TextToImageFormatter):  # noqa: N801 - the name align-anything users know
    """Align-Anything text-to-image rows: ``{prompt, image_1, image_2, overall_image}`` with ``overall_image``
    1 or 2 naming the better image (the layout of align-anything's text-to-image preference template).
    Supervised samples use an ``image`` column when the row has one (SFT files), else the better image.
    """

    def format_preference_sample(
        self, raw_sample: Mapping[str, Any]
    ) -> tuple[Conversation, Conversation, Meta]:
        better = one_or_two(self, raw_sample, "overall_image")
        return self.pair(raw_sample, (f"image_{better}",), (f"image_{3 - better}",))

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        self._check_row(raw_sample)
        if raw_sample.get("image") is not None:
            image = self.image(raw_sample, "image")
        else:
            image = self.image(raw_sample, f"image_{one_or_two(self, raw_sample, 'overall_image')}")
        return self.with_image(self.prompt(raw_sample), image), {}
