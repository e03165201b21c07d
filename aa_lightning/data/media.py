"""Media references and loaders: images, audio and video from paths, bytes or decoded dataset columns.

Encoding (cached) only *references* media: :func:`resolve_media` turns whatever a formatter found in a row
(a path relative to the data file, bytes, a ``datasets`` ``{bytes, path}`` dict, a PIL image, an audio
``{array, sampling_rate}`` dict) into a small JSON-able dict and checks what is cheap to check (the file
exists; an audio clip is not longer than the feature extractor takes). Decoding happens in the collator
(:class:`MediaLoader`), so a cached dataset stays small. When the data is prepared every item is decoded
once (:meth:`MediaLoader.check_sample`), so a corrupt or truncated file is a bad row of the data set found
before training starts (not hours into a run, when a batch first touches it).

Every error is a :class:`DataFormatError` whose ``field`` is the row's column (``images[1]``) and whose
message names the media file, so the dataset layer only adds the data file and row.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from aa_lightning.data.errors import DataFormatError

__all__ = [
    "MEDIA_KEYS",
    "MediaLoader",
    "audio_duration",
    "check_image",
    "load_audio",
    "load_image",
    "load_video",
    "media_item",
    "media_label",
    "resolve_media",
]

MEDIA_KEYS: dict[str, str] = {"images": "image", "audios": "audio", "videos": "video"}
"""Meta key (a list of references, in placeholder order) -> the media kind it holds."""


def media_item(value: Any, field: str) -> dict[str, Any]:
    """Wrap a raw media value with the row column it came from, so errors name that column."""
    return {"value": value, "field": field}


def _error(reason: str, field: str | None) -> DataFormatError:
    return DataFormatError(reason, field=field)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def resolve_media(value: Any, field: str, root: str | os.PathLike | None = None, kind: str = "image") -> dict:
    """A JSON-able reference ``{"field", "path"}`` or ``{"field", "bytes"}`` (base64) for one media value.

    Relative paths are resolved against ``root`` (the data file's folder) and must exist. Decoded values
    (PIL images, audio arrays, torchcodec audio decoders) are stored losslessly as PNG / float WAV bytes.
    """
    if isinstance(value, Mapping) and "value" in value and "field" in value:
        value, field = value["value"], str(value["field"])
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"field": field, "bytes": _b64(bytes(value))}
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return resolve_media(value["bytes"], field, root, kind)
        if value.get("array") is not None and value.get("sampling_rate") is not None:
            return {"field": field, "bytes": _b64(_wav_bytes(value["array"], int(value["sampling_rate"])))}
        if value.get("path"):
            return resolve_media(value["path"], field, root, kind)
        raise _error(
            f"a {kind} mapping needs 'bytes', 'path' or 'array' + 'sampling_rate'; got keys {sorted(value)}",
            field,
        )
    if callable(getattr(value, "get_all_samples", None)):  # a torchcodec AudioDecoder (datasets Audio column)
        samples = value.get_all_samples()
        array = samples.data.numpy().T  # (channels, frames) -> (frames, channels)
        return {"field": field, "bytes": _b64(_wav_bytes(array, int(samples.sample_rate)))}
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value).strip()
        if not path:
            raise _error(f"expected a {kind} path, got an empty string", field)
        if path.startswith(("http://", "https://")):
            raise _error(f"remote {kind} {path!r} is not fetched: download it and use a local path", field)
        path = os.path.expanduser(path.removeprefix("file://"))
        if not os.path.isabs(path):
            path = os.path.join(os.fspath(root) if root else os.getcwd(), path)
        path = os.path.normpath(path)
        if not os.path.isfile(path):
            raise _error(f"{kind} file not found: {path}", field)
        return {"field": field, "path": path}
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None  # noqa: N806
    if Image is not None and isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")  # lossless, whatever the source format was
        return {"field": field, "bytes": _b64(buffer.getvalue())}
    raise _error(
        f"unsupported {kind} value of type {type(value).__name__} (expected a path, bytes, a "
        "{bytes, path} mapping" + (", a PIL image" if kind == "image" else "") + ")",
        field,
    )


def _wav_bytes(array: Any, sampling_rate: int) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(array, dtype=np.float32), sampling_rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def media_label(ref: Mapping[str, Any]) -> str:
    """How an error message names a media reference: its path, or the size of the bytes held in the row."""
    if ref.get("path"):
        return str(ref["path"])
    return f"<{len(ref.get('bytes', '')) * 3 // 4} bytes in the row>"


def _source(ref: Mapping[str, Any]) -> Any:
    if ref.get("path"):
        return ref["path"]
    return io.BytesIO(base64.b64decode(ref["bytes"]))


# ---------------------------------------------------------------------------------------------- image
def check_image(ref: Mapping[str, Any]) -> None:
    """Decode the whole image as :func:`load_image` does, but JPEGs at 1/8 scale (every byte is still
    read, so a truncated file fails) to keep checking a large data set cheap."""
    from PIL import Image

    try:
        with Image.open(_source(ref)) as opened:
            opened.draft("RGB", (1, 1))  # JPEG only: the smallest DCT scale; a no-op for other formats
            opened.load()
    except Exception as err:  # the same errors as load_image
        raise _error(f"cannot decode image {media_label(ref)}: {err}", ref.get("field")) from err


def load_image(ref: Mapping[str, Any]) -> Any:
    """An RGB PIL image; transparent pixels are composited onto white (not left as arbitrary colours)."""
    from PIL import Image

    try:
        with Image.open(_source(ref)) as opened:
            image = opened.copy() if opened.mode in ("RGB", "L") else opened.convert("RGBA")
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError ...)
        raise _error(f"cannot decode image {media_label(ref)}: {err}", ref.get("field")) from err
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------- audio
def audio_duration(ref: Mapping[str, Any]) -> float:
    """Seconds of audio, read from the file header (cheap: nothing is decoded)."""
    import soundfile as sf

    try:
        info = sf.info(_source(ref))
    except Exception as err:
        raise _error(f"cannot read audio {media_label(ref)}: {err}", ref.get("field")) from err
    return float(info.frames) / float(info.samplerate)


def load_audio(ref: Mapping[str, Any], sampling_rate: int) -> np.ndarray:
    """Mono float32 samples at ``sampling_rate`` (channels averaged; resampled with torchaudio)."""
    import soundfile as sf
    import torch
    import torchaudio.functional as AF  # noqa: N812

    try:
        with sf.SoundFile(_source(ref)) as opened:
            missing = missing_audio_bytes(opened.extra_info)
            data = opened.read(dtype="float32", always_2d=True)  # (frames, channels)
            rate = opened.samplerate
    except Exception as err:
        raise _error(f"cannot decode audio {media_label(ref)}: {err}", ref.get("field")) from err
    if missing is not None:
        raise _error(
            f"audio {media_label(ref)} is truncated: its header declares {missing[0]} bytes of samples, the "
            f"file holds {missing[1]}",
            ref.get("field"),
        )
    if data.shape[0] == 0:
        raise _error(f"audio {media_label(ref)} holds no samples", ref.get("field"))
    mono = data.mean(axis=1)
    if rate != sampling_rate:
        mono = AF.resample(torch.from_numpy(mono), int(rate), int(sampling_rate)).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)


# libsndfile's log of a WAV/AIFF whose data chunk is shorter than its header says: "data : 92842 (should be 1956)"
_CHUNK_SIZE_LOG = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_UNKNOWN_LENGTH = 0x7FFFF000  # streaming writers put 0xFFFFFFFF (or near) when they cannot know the size


def missing_audio_bytes(log: str) -> tuple[int, int] | None:
    """``(declared, present)`` sample bytes when the file ends before its header says (a cut download),
    from libsndfile's open log; None when it is whole or its writer did not know the length.

    libsndfile reads such a file without complaint, so the clip would silently lose its end.
    """
    for declared, present in _CHUNK_SIZE_LOG.findall(log or ""):
        if int(present) < int(declared) < _UNKNOWN_LENGTH:
            return int(declared), int(present)
    return None


# ---------------------------------------------------------------------------------------------- video
def sample_indices(total: int, count: int) -> np.ndarray:
    """``count`` frame indices spread uniformly over ``total`` frames (first and last included)."""
    count = max(1, min(count, total))
    return np.linspace(0, total - 1, count).round().astype(np.int64)


def load_video(
    ref: Mapping[str, Any], num_frames: int | None = 8, fps: float | None = None, max_frames: int = 32
) -> np.ndarray:
    """Uniformly sampled RGB frames ``(T, H, W, 3)`` uint8, decoded with PyAV.

    ``num_frames`` frames, or, when ``fps`` is set, ``duration * fps`` frames; never more than
    ``max_frames``. Only the frames up to the last sampled one are decoded.
    """
    try:
        import av
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("video decoding needs PyAV: pip install av") from err
    field = ref.get("field")
    try:
        with av.open(_source(ref)) as container:
            if not container.streams.video:
                raise _error(f"video {media_label(ref)} has no video stream", field)
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            duration = float(stream.duration * stream.time_base) if stream.duration else 0.0
            if not duration and container.duration:
                duration = container.duration / 1e6
            total = int(stream.frames or round(duration * rate))
            if total <= 0:  # no frame count in the header: count by decoding once
                total = sum(1 for _ in container.decode(stream))
                container.seek(0)
            if fps is not None:
                if not duration:
                    duration = total / rate if rate else 0.0
                count = max(1, round(duration * fps))
            elif num_frames is not None:
                count = num_frames
            else:
                raise ValueError("set num_frames or fps to sample video frames")
            wanted = sample_indices(total, min(count, max_frames))
            frames: dict[int, np.ndarray] = {}
            last = int(wanted[-1])
            targets = set(wanted.tolist())
            for index, frame in enumerate(container.decode(stream)):
                if index in targets:
                    frames[index] = frame.to_ndarray(format="rgb24")
                if index >= last:
                    break
    except DataFormatError:
        raise
    except Exception as err:  # av.error.InvalidDataError, OSError ...
        raise _error(f"cannot decode video {media_label(ref)}: {err}", field) from err
    if not frames:
        raise _error(f"video {media_label(ref)} has no decodable frames", field)
    # a header may overstate the frame count: reuse the last decoded frame for indices past the end
    decoded = [frames[i] for i in sorted(frames)]
    out = [frames.get(int(i), decoded[-1]) for i in wanted]
    return np.stack(out)


# ---------------------------------------------------------------------------------------------- loader
@dataclass
class MediaLoader:
    """Decodes a sample's media references for the collator, with the settings of one datamodule."""

    sampling_rate: int | None = None
    num_frames: int | None = 8
    fps: float | None = None
    max_frames: int = 32

    def load(self, key: str, ref: Mapping[str, Any]) -> Any:
        if key == "images":
            return load_image(ref)
        if key == "audios":
            if self.sampling_rate is None:
                raise _error(
                    "the processor has no feature extractor sampling rate for audio", ref.get("field")
                )
            return load_audio(ref, self.sampling_rate)
        if key == "videos":
            return load_video(ref, self.num_frames, self.fps, self.max_frames)
        raise KeyError(f"unknown media key {key!r}; expected one of {sorted(MEDIA_KEYS)}")

    def check(self, key: str, ref: Mapping[str, Any]) -> None:
        """Raise the :class:`DataFormatError` that loading ``ref`` in the collator would raise, if any."""
        if key == "images":
            check_image(ref)
        else:
            self.load(key, ref)

    def check_sample(self, meta: Mapping[str, Any] | str) -> None:
        """Decode every media item of one encoded sample (its ``meta``, as stored or parsed) once."""
        if isinstance(meta, str):
            meta = json.loads(meta)
        for key in MEDIA_KEYS:
            for ref in meta.get(key) or []:
                self.check(key, ref)

    def load_sample(self, meta: Mapping[str, Any]) -> dict[str, list[Any]]:
        """Every media item of one sample, by meta key (raises on the first that fails)."""
        return {key: [self.load(key, ref) for ref in meta[key]] for key in MEDIA_KEYS if meta.get(key)}
