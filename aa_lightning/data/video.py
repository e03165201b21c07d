"""Text + video -> text (tv2t): conversations with video clips for Qwen2-VL-style processors."""

from __future__ import annotations

from typing import Any

from aa_lightning.data.media import MediaLoader
from aa_lightning.data.multimodal import MultimodalDataModule

__all__ = ["TextVideoToTextDataModule"]


class TextVideoToTextDataModule(MultimodalDataModule):
    """Video + text rows: frames are decoded with PyAV and sampled uniformly over the clip.

    Args (besides those of :class:`~aa_lightning.data.multimodal.MultimodalDataModule`):
        num_frames: frames per clip (used when ``fps`` is not set).
        fps: sample this many frames per second of video instead of a fixed count.
        max_frames: upper bound on frames per clip (long clips with ``fps``).
    """

    modalities = ("videos",)

    def __init__(
        self,
        *args: Any,
        num_frames: int | None = 8,
        fps: float | None = None,
        max_frames: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if num_frames is None and fps is None:
            raise ValueError("set num_frames or fps to sample video frames")
        self.num_frames, self.fps, self.max_frames = num_frames, fps, max_frames

    def media_loader(self) -> MediaLoader:
        return MediaLoader(num_frames=self.num_frames, fps=self.fps, max_frames=self.max_frames)
