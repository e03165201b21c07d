"""Formatter for speech recognition manifests: an audio clip and its transcript become an ASR conversation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.base import BaseFormatter, Conversation, Meta
from aa_lightning.data.formatters.registry import register_template
from aa_lightning.data.media import media_item

__all__ = ["SpeechASR"]


@register_template("Speech-ASR")
class SpeechASR(BaseFormatter):
    """Speech recognition rows: an audio column (``audio``/``wav``/``path``) and its transcript
    (``text``/``wrd``/``transcript``/``sentence``), e.g. speechbrain's ASR manifests.

    The user turn is the clip plus :attr:`instruction`; the assistant turn is the transcript. A
    ``{data_root}/`` prefix (speechbrain manifests) means "next to the data file". Meta: ``audios``;
    prompt-only adds ``reference`` (the transcript).
    """

    instruction: str = "Transcribe the speech."
    audio_keys = ("audio", "wav", "path", "audio_path")
    text_keys = ("text", "wrd", "transcript", "sentence")

    def audio(self, raw_sample: Mapping[str, Any]) -> Meta:
        for key in self.audio_keys:
            value = raw_sample.get(key)
            if value is not None:
                if isinstance(value, str):
                    value = value.replace("{data_root}/", "")
                return {"audios": [media_item(value, key)]}
        raise DataFormatError(
            f"missing audio (the row needs one of {', '.join(self.audio_keys)})", field=self.audio_keys[0]
        )

    def transcript(self, raw_sample: Mapping[str, Any]) -> str:
        for key in self.text_keys:
            if key in raw_sample:
                return self.field(raw_sample, key).strip()
        raise DataFormatError(
            f"missing transcript (the row needs one of {', '.join(self.text_keys)})", field=self.text_keys[0]
        )

    def prompt(self) -> Conversation:
        return self.with_system(
            [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": self.instruction}]}]
        )

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        text = self.transcript(raw_sample)
        return [*self.prompt(), {"role": "assistant", "content": text}], self.audio(raw_sample)

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        return self.prompt(), {**self.audio(raw_sample), "reference": self.transcript(raw_sample)}
