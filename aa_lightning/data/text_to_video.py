"""Text -> video (t2v): prompt + clip rows for text-to-video diffusion models (SFT on clips, Diffusion-DPO on
clip pairs).

Everything of :mod:`aa_lightning.data.text_to_image` carries over (data specs, formatters by template name,
the cache, bad rows named by file, row and column when the data is prepared, the resumable loader, one scored
unit per row); what differs is the media: each clip is decoded with PyAV (:func:`~aa_lightning.data.media.load_video`),
``num_frames`` frames sampled uniformly over it, every frame resized (shorter side) and center-cropped to
``resolution``. Batches hold ``pixel_values_videos`` ``(N, F, 3, R, R)`` float32 in [-1, 1] (the key the
multimodal side uses for video) instead of ``pixel_values``; tokens, ``noise_seed``, ``extra`` and ``meta``
are as for images (chosen rows first, a pair's rows sharing the seed).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import datasets
import torch
from PIL import Image

from aa_lightning.data.datamodule import fingerprint_of
from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.base import Meta
from aa_lightning.data.media import load_video, media_label
from aa_lightning.data.reports import DataReport
from aa_lightning.data.sources import DataSpec
from aa_lightning.data.text_to_image import PromptImageReport, TextToImageDataModule, TextToImageEncoder
from aa_lightning.data.text_to_image_collator import TextToImageCollator, image_tensor

__all__ = [
    "VIDEO_SIDES",
    "TextToVideoCollator",
    "TextToVideoDataModule",
    "TextToVideoEncoder",
    "video_tensor",
]

#: Per kind, the batch-meta names of a sample's clips, in the order they are stored (``meta["videos"]``).
VIDEO_SIDES = {"supervised": ("video",), "preference": ("chosen_video", "rejected_video"), "prompt_only": ()}


def video_tensor(
    ref: Mapping[str, Any], num_frames: int, resolution: int, flip: bool = False
) -> torch.Tensor:
    """``(num_frames, 3, R, R)`` float32 in [-1, 1]: ``num_frames`` frames spread uniformly over the clip,
    each resized and center-cropped as :func:`image_tensor` does (all frames flipped alike).

    A clip with fewer frames than ``num_frames`` is refused (a DataFormatError naming it), rather than
    padded with repeated frames the model would learn as a still.
    """
    frames = load_video(ref, num_frames=num_frames, max_frames=num_frames)
    if len(frames) < num_frames:
        raise DataFormatError(
            f"video {media_label(ref)} has {len(frames)} frame(s), fewer than num_frames={num_frames}",
            field=ref.get("field"),
        )
    return torch.stack([image_tensor(Image.fromarray(frame), resolution, flip) for frame in frames])


class TextToVideoEncoder(TextToImageEncoder):
    """The text-to-image encoder with clips: references go to ``meta["videos"]`` (checked to exist)."""

    media_type = "video"
    meta_key = "videos"
    templates = "T2V-Prompt-Video, AA_T2V"


class TextToVideoCollator(TextToImageCollator):
    """Encoded text-to-video samples -> a batch with ``pixel_values_videos`` ``(N, F, 3, R, R)``."""

    meta_key = "videos"
    batch_key = "pixel_values_videos"
    sides = VIDEO_SIDES

    def __init__(self, *args: Any, num_frames: int = 16, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_frames = num_frames

    def media_tensor(self, ref: Mapping[str, Any], flip: bool) -> torch.Tensor:
        return video_tensor(ref, self.num_frames, self.resolution, flip)


class PromptVideoReport(PromptImageReport):
    """:class:`DataReport` worded for prompts and clips."""

    identical_note = "preference pairs have the same chosen and rejected clip and carry no signal"


def check_clips(num_frames: int, resolution: int, sample: dict[str, Any]) -> None:
    """Decode every clip of one encoded sample as the collator will (raises a DataFormatError)."""
    import json

    meta: Meta = json.loads(sample["meta"]) if isinstance(sample["meta"], str) else sample["meta"]
    for ref in meta.get("videos") or []:
        video_tensor(ref, num_frames, resolution)


class TextToVideoDataModule(TextToImageDataModule):
    """Prompt + clip rows for a text-to-video diffusion model (batches: see the module doc).

    Takes the arguments of :class:`~aa_lightning.data.text_to_image.TextToImageDataModule` (templates
    ``T2V-Prompt-Video`` and ``AA_T2V``; clip paths relative to the data file or ``media_root``), and:

    Args:
        num_frames: frames per clip, sampled uniformly over it (first and last included); a clip with fewer
            frames is a bad row (named when the data is prepared). TextToVideoSD models were trained on 16.
        resolution: every frame is resized (shorter side) and center-cropped to ``resolution`` x ``resolution``.
        random_flip: flip a training clip left-right with probability 0.5 (all its frames; a pair's clips
            alike).
    """

    def __init__(self, *args: Any, num_frames: int = 16, resolution: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, resolution=resolution, **kwargs)
        if num_frames < 1:
            raise ValueError(f"num_frames must be a positive number of frames, got {num_frames}")

    def build_encoder(self) -> TextToVideoEncoder:  # type: ignore[override]
        return TextToVideoEncoder(self.tokenizer, self.max_length, self._spec_root, self._spec_source)

    def sample_check(self) -> Callable[[dict[str, Any]], None]:
        """Decode every clip of each row when the data is prepared (a corrupt or short clip is a bad row)."""
        return functools.partial(check_clips, self.hparams.num_frames, self.hparams.resolution)

    def new_report(self, source: str, total: int) -> DataReport:
        return PromptVideoReport(source, total, self.max_length)

    def _fingerprint(self, rows: datasets.Dataset, spec: DataSpec, kind: str, formatter: Any) -> str:
        parts = {
            "image": super()._fingerprint(rows, spec, kind, formatter),
            "encoder": inspect.getsource(TextToVideoEncoder),
            "check": [inspect.getsource(check_clips), inspect.getsource(video_tensor)],
            "num_frames": self.hparams.num_frames,
            "resolution": self.hparams.resolution,
        }
        return fingerprint_of(parts)

    def build_collator(self, kind: str) -> TextToVideoCollator:
        return TextToVideoCollator(
            kind,
            self.tokenizer.pad_token_id,
            self.max_length,
            self.hparams.resolution,
            random_flip=self.hparams.random_flip,
            padding_side=self.tokenizer.padding_side,
            num_frames=self.hparams.num_frames,
        )
