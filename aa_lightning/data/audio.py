"""Text + audio -> text (ta2t): conversations with audio clips for Qwen2-Audio-style processors."""

from __future__ import annotations

from typing import Any

from aa_lightning.data.multimodal import MultimodalDataModule

__all__ = ["TextAudioToTextDataModule"]


class TextAudioToTextDataModule(MultimodalDataModule):
    """Audio + text rows: clips are read with soundfile, mixed to mono and resampled (torchaudio) to the
    feature extractor's sampling rate.

    Args (besides those of :class:`~aa_lightning.data.multimodal.MultimodalDataModule`):
        max_audio_seconds: longest clip accepted; default: what the feature extractor takes (30 s for
            Whisper-style extractors). A longer clip is a bad row (an error naming file, row and column,
            or skipped and counted with ``on_bad_row: skip``), never cut silently.
    """

    modalities = ("audios",)

    def __init__(self, *args: Any, max_audio_seconds: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.audio_seconds_limit = max_audio_seconds

    def max_audio_seconds(self) -> float | None:
        return self.audio_seconds_limit
