"""Media of logged samples in TensorBoard: the image, audio clip or video frames a response answered.

The RL modules log a markdown table of prompts and responses; for a multimodal run that table alone does not
show *what* the model looked at or listened to. :func:`log_sample_media` reads the media references the
data layer keeps in each sample's ``meta`` (``images`` / ``audios`` / ``videos``, see
:data:`aa_lightning.data.media.MEDIA_KEYS`), decodes them with the same loaders as the collator and writes
them under one tag prefix per sample, next to that sample's text::

    rollout/sample_0/text     prompt, response and numbers (TEXT tab)
    rollout/sample_0/image    the image (IMAGES tab; ``image_1`` ... for more images of the same sample)
    rollout/sample_0/audio    the clip, mono, in [-1, 1] (AUDIO tab)
    rollout/sample_0/video    a few uniformly sampled frames (IMAGES tab; no moviepy needed)
    rollout/sample_0/output   the image the model generated, for an image-output family (IMAGES tab)

Callers pass only the metas: nothing here depends on the algorithm, and the algorithm never names a modality.
A reference that cannot be decoded is skipped with a warning: logging never stops training.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger

from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.media import MEDIA_KEYS, load_audio, load_image, load_video

__all__ = [
    "RolloutMediaLogger",
    "frame_strip",
    "log_generated_output",
    "log_sample_media",
    "media_sampling_rate",
]


class RolloutMediaLogger(pl.Callback):
    """Writes the media each logged rollout sample answered next to its text, in every TensorBoard logger.

    Fed by the RL modules' callback hook ``on_rollout_samples(trainer, pl_module, samples)``, called every
    ``sample_log_interval`` rollouts with dicts ``{prompt, response, scores, meta, text}``. The ``aa`` command
    adds this callback to every run (``--rollout_media.enabled false`` turns it off).
    """

    def __init__(self, enabled: bool = True, num_frames: int = 4, max_side: int = 512) -> None:
        self.enabled = enabled
        self.num_frames = num_frames
        self.max_side = max_side

    def on_rollout_samples(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, samples: list[dict]
    ) -> None:
        metas = [sample.get("meta") for sample in samples]
        outputs = [sample.get("response") for sample in samples]
        generated_media = any(not isinstance(output, str) for output in outputs if output is not None)
        if not self.enabled or not (any(metas) or generated_media):
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                log_sample_media(
                    logger.experiment,
                    "rollout",
                    metas,
                    trainer.global_step,
                    texts=[sample.get("text", "") for sample in samples],
                    outputs=outputs,
                    processor=getattr(pl_module, "processor", None),
                    num_frames=self.num_frames,
                    max_side=self.max_side,
                )


log = logging.getLogger(__name__)

DEFAULT_SAMPLING_RATE = 16000


def media_sampling_rate(processor: Any) -> int:
    """The audio rate the processor's feature extractor reads (what the model heard), else 16 kHz."""
    rate = getattr(getattr(processor, "feature_extractor", None), "sampling_rate", None)
    return int(rate) if rate else DEFAULT_SAMPLING_RATE


def _shrink(frame: np.ndarray, max_side: int) -> np.ndarray:
    """An HWC uint8 frame whose longest side is at most ``max_side`` (keeps event files small)."""
    height, width = frame.shape[:2]
    if max(height, width) <= max_side:
        return frame
    from PIL import Image

    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(frame).resize(size, Image.BILINEAR))


def frame_strip(
    frames: Sequence[Any], num_frames: int | None = None, max_side: int | None = None
) -> np.ndarray:
    """One HWC uint8 image: ``num_frames`` uniformly spaced frames (all when None) side by side, each shrunk to
    ``max_side`` first. A video as ONE image shows its motion at a glance and needs no video encoder."""
    if not len(frames):
        raise ValueError("a frame strip needs at least one frame")
    if num_frames is not None and len(frames) > num_frames:
        frames = [frames[int(i)] for i in np.linspace(0, len(frames) - 1, num_frames).round()]
    arrays = [np.asarray(f.convert("RGB") if hasattr(f, "convert") else f, dtype=np.uint8) for f in frames]
    if max_side is not None:
        arrays = [_shrink(np.ascontiguousarray(a), max_side) for a in arrays]
    return np.concatenate(arrays, axis=1)


def log_generated_output(
    experiment: Any, tag: str, value: Any, step: int, num_frames: int = 4, max_side: int = 512
) -> str:
    """Write one output of a family's ``generate_outputs`` under ``tag``; returns its kind.

    The kinds are what :func:`aa_lightning.callbacks.predictions.save_media` writes as files: a PIL image
    (IMAGES tab), ``{"audio": waveform, "sampling_rate": int}`` (AUDIO tab, mono, clipped to [-1, 1]), a
    list of PIL frames (a video: IMAGES tab, one :func:`frame_strip`)."""
    from PIL import Image

    if isinstance(value, Image.Image):
        experiment.add_image(
            tag, _shrink(np.asarray(value.convert("RGB")), max_side), step, dataformats="HWC"
        )
        return "image"
    if isinstance(value, Mapping) and "audio" in value:
        import torch

        wave = np.asarray(value["audio"], dtype=np.float32)
        if wave.ndim == 2:  # (channels, samples): TensorBoard plays one channel
            wave = wave.mean(axis=0)
        wave = np.clip(wave.reshape(-1), -1.0, 1.0)
        rate = int(value["sampling_rate"])
        experiment.add_audio(tag, torch.from_numpy(wave).unsqueeze(0), step, sample_rate=rate)
        return "audio"
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], Image.Image):
        experiment.add_image(tag, frame_strip(value, num_frames, max_side), step, dataformats="HWC")
        return "video"
    raise TypeError(f"cannot log a generated output of type {type(value).__name__} to TensorBoard")


def _log_one(
    experiment: Any,
    tag: str,
    kind: str,
    ref: Mapping[str, Any],
    step: int,
    sampling_rate: int,
    num_frames: int,
    max_side: int,
) -> None:
    if kind == "image":
        frame = _shrink(np.asarray(load_image(ref), dtype=np.uint8), max_side)
        experiment.add_image(tag, frame, step, dataformats="HWC")
    elif kind == "audio":
        import torch

        samples = np.clip(load_audio(ref, sampling_rate), -1.0, 1.0)
        experiment.add_audio(tag, torch.from_numpy(samples).unsqueeze(0), step, sample_rate=sampling_rate)
    elif kind == "video":
        frames = load_video(ref, num_frames=num_frames)
        frames = np.stack([_shrink(np.ascontiguousarray(f), max_side) for f in frames])
        experiment.add_images(tag, frames, step, dataformats="NHWC")
    else:  # pragma: no cover - MEDIA_KEYS and this function change together
        raise KeyError(kind)


def log_sample_media(
    experiment: Any,
    tag_prefix: str,
    metas: Sequence[Mapping[str, Any] | None],
    step: int,
    texts: Sequence[str] | None = None,
    processor: Any = None,
    num_frames: int = 4,
    max_side: int = 512,
    outputs: Sequence[Any] | None = None,
) -> int:
    """Write each sample's media, and the text of samples with media, under ``{tag_prefix}/sample_{i}``.

    Args:
        experiment: a TensorBoard ``SummaryWriter`` (``TensorBoardLogger.experiment``).
        tag_prefix: e.g. ``rollout``.
        metas: the samples' meta dicts, in the order of ``texts``; samples without media add nothing.
        step: the global step of the summaries.
        texts: markdown shown as ``{tag_prefix}/sample_{i}/text`` next to the media (prompt and response).
        processor: the model's processor; audio is logged at its feature extractor's sampling rate.
        num_frames: frames shown per video.
        max_side: images and frames are shrunk to at most this many pixels on their longest side.
        outputs: the samples' responses; a generated image (an image family's decoded tokens) is written as
            ``{tag_prefix}/sample_{i}/output`` (text responses are in ``texts`` already).

    Returns the number of media items written.
    """
    rate = media_sampling_rate(processor)
    written = 0
    for i, meta in enumerate(metas):
        sample_written = 0
        output = outputs[i] if outputs is not None and i < len(outputs) else None
        if output is not None and hasattr(output, "convert"):  # a PIL image the model generated
            frame = _shrink(np.asarray(output.convert("RGB"), dtype=np.uint8), max_side)
            experiment.add_image(f"{tag_prefix}/sample_{i}/output", frame, step, dataformats="HWC")
            sample_written += 1
        if not meta and not sample_written:
            continue
        meta = meta or {}
        for key, kind in MEDIA_KEYS.items():
            refs = meta.get(key) or []
            for j, ref in enumerate(refs if isinstance(refs, (list, tuple)) else [refs]):
                tag = f"{tag_prefix}/sample_{i}/{kind}" + (f"_{j}" if j else "")
                try:
                    _log_one(experiment, tag, kind, ref, step, rate, num_frames, max_side)
                except (DataFormatError, OSError, ValueError, TypeError) as err:
                    log.warning("cannot log %s of sample %d to TensorBoard: %s", kind, i, err)
                    continue
                sample_written += 1
        if sample_written and texts is not None and i < len(texts):
            experiment.add_text(f"{tag_prefix}/sample_{i}/text", texts[i], step)
        written += sample_written
    return written
