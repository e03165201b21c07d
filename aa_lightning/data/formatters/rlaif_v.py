"""Formatter for RLAIF-V rows: one image and a question, with a reference answer or a preference pair."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.base import BaseFormatter, Conversation, Meta
from aa_lightning.data.formatters.registry import register_template
from aa_lightning.data.media import media_item

__all__ = ["RLAIFV"]


@register_template("RLAIF-V")
class RLAIFV(BaseFormatter):
    """RLAIF-V rows: ``{question, image_path | image, metainfos?: {reference}, chosen?, rejected?}``.

    The ``detail_test`` prompt files are prompt-only (VLM RL): meta ``reference`` from
    ``metainfos.reference`` when non-empty. Rows of the RLAIF-V preference set (``chosen``/``rejected``)
    also give preference samples, and supervised samples on ``chosen``.
    """

    def image(self, raw_sample: Mapping[str, Any]) -> Meta:
        for key in ("image_path", "image"):
            if raw_sample.get(key) is not None:
                return {"images": [media_item(raw_sample[key], key)]}
        raise DataFormatError(
            "missing required key (the row needs 'image_path' or 'image')", field="image_path"
        )

    def prompt(self, raw_sample: Mapping[str, Any]) -> Conversation:
        question = self.field(raw_sample, "question")
        return self.with_system(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        )

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        meta = self.image(raw_sample)
        info = self.optional_field(raw_sample, "metainfos", kind=dict, default={})
        reference = info.get("reference")
        if isinstance(reference, str) and reference.strip():
            meta["reference"] = reference
        return self.prompt(raw_sample), meta

    def format_preference_sample(
        self, raw_sample: Mapping[str, Any]
    ) -> tuple[Conversation, Conversation, Meta]:
        prompt = self.prompt(raw_sample)
        chosen, rejected = self.field(raw_sample, "chosen"), self.field(raw_sample, "rejected")
        return (
            [*prompt, {"role": "assistant", "content": chosen}],
            [*prompt, {"role": "assistant", "content": rejected}],
            {**self.image(raw_sample), **self.preference_meta(raw_sample)},
        )

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        chosen = self.field(raw_sample, "chosen")
        return [*self.prompt(raw_sample), {"role": "assistant", "content": chosen}], self.image(raw_sample)
