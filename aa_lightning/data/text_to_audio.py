"""Text -> audio (t2a): prompt + audio rows for AudioLDM-style diffusion models (SFT, Diffusion-DPO on pairs).

Everything of :class:`~aa_lightning.data.text_to_image.TextToImageDataModule` carries over (data specs,
formatters by template name, the cache, bad rows named by file, row and column at prepare time, every clip
decoded once then, ``on_bad_row: skip``, one scored unit per row); what differs is the output:

Batch keys: ``input_ids``/``attention_mask`` ``(N, max_length)`` (the pipeline tokenizer's, padded to its
``model_max_length``), ``audio_mels`` ``(N, 1, frames, n_mels)`` float32 log-mel spectrograms (the layout the
pipeline's VAE encodes and its vocoder reads; :mod:`aa_lightning.data.audio_mel` says how they are computed and
why), ``noise_seed`` ``(N,)`` int64 (preference rows ``i`` and ``i + B`` share it), ``extra`` and ``meta``
(prompt and clip paths). ``input_features`` is not used: speech models read it as their processor's features,
and these are not those. Clips are decoded with :func:`~aa_lightning.data.media.load_audio` (mono, resampled
with torchaudio to the vocoder's rate), then cut or zero-padded to ``duration`` seconds.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import torch

from aa_lightning.data import audio_mel as audio_mel_module
from aa_lightning.data.datamodule import fingerprint_of
from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.base import Conversation, Meta
from aa_lightning.data.media import MediaLoader, load_audio, resolve_media
from aa_lightning.data.multimodal import check_media
from aa_lightning.data.reports import CUT, SAME, DataReport
from aa_lightning.data.sources import DataSpec
from aa_lightning.data.text_to_image import TextToImageDataModule, TextToImageEncoder, tokenizer_folder
from aa_lightning.data.text_to_image_collator import TextToImageCollator
from aa_lightning.models.aliases import resolve_model_path

__all__ = ["AUDIO_SIDES", "TextToAudioCollator", "TextToAudioDataModule", "TextToAudioEncoder"]

#: Per kind, the batch-meta names of a sample's clips, in the order they are stored (``meta["audios"]``).
AUDIO_SIDES = {"supervised": ("audio",), "preference": ("chosen_audio", "rejected_audio"), "prompt_only": ()}


class TextToAudioEncoder(TextToImageEncoder):
    """One formatted text-to-audio row -> ``input_ids``, ``prompt`` and ``meta`` (``audios`` = the clips'
    references in :data:`AUDIO_SIDES` order, ``_source`` = the data file)."""

    @staticmethod
    def prompt_and_image(conversation: Conversation, side: str, with_image: bool = True) -> tuple[str, Any]:
        """The prompt and the clip of ``[user: prompt, assistant: [audio part]]``."""
        roles = [message.get("role") for message in conversation]
        expected = ["user", "assistant"] if with_image else ["user"]
        parts = conversation[-1].get("content") if with_image and roles == expected else None
        clips = [p.get("audio") for p in parts or () if isinstance(p, dict) and p.get("type") == "audio"]
        if roles != expected or (with_image and (len(clips) != 1 or clips[0] is None)):
            what = "a prompt (user turn) and one audio clip (assistant turn)" if with_image else "a prompt"
            raise DataFormatError(
                f"a text-to-audio {side} sample is {what}, but the formatter gave the turns {roles} (use a "
                "text-to-audio template: T2A-Prompt-Audio, AA_T2A)"
            )
        prompt = conversation[0]["content"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataFormatError(f"expected a non-empty prompt text, got {prompt!r}")
        return prompt, clips[0] if with_image else None

    def _encode(self, prompt: str, images: Sequence[Any], meta: Meta) -> dict[str, Any]:
        ids = self.tokens(prompt)
        if not ids:
            raise DataFormatError(f"the prompt {prompt!r} has no tokens")
        refs = [resolve_media(clip, "audio", self.media_root, "audio") for clip in images]
        stored = {**meta, "audios": refs, "_source": self.source}
        return {"input_ids": ids, "prompt": prompt, "meta": json.dumps(stored)}


class PromptAudioReport(DataReport):
    cut_short_note = "the text encoder never sees the ends of their prompts"
    identical_note = "preference pairs have the same chosen and rejected clip and carry no signal"


def _same_clips(sample: dict[str, Any]) -> bool:
    refs = json.loads(sample["meta"])["audios"]
    return len(refs) == 2 and {k: v for k, v in refs[0].items() if k != "field"} == {
        k: v for k, v in refs[1].items() if k != "field"
    }


def _notes(encoder: TextToAudioEncoder, kind: str, sample: dict[str, Any], formatted: Sequence[Any]) -> str:
    notes = [CUT] if encoder.is_cut(sample) else []
    if kind == "preference" and _same_clips(sample):
        notes.append(SAME)
    return " ".join(notes)


class TextToAudioCollator(TextToImageCollator):
    """Encoded text-to-audio samples -> a batch (module doc): the image collator with clips as the media."""

    meta_key = "audios"
    batch_key = "audio_mels"
    sides = AUDIO_SIDES

    def __init__(
        self,
        kind: str,
        pad_token_id: int,
        max_length: int,
        mel: audio_mel_module.MelSettings,
        padding_side: str = "right",
    ) -> None:
        super().__init__(kind, pad_token_id, max_length, resolution=1, padding_side=padding_side)
        self.mel = mel

    def media_tensor(self, ref: Mapping[str, Any], flip: bool) -> torch.Tensor:
        """One clip reference -> its ``(1, frames, n_mels)`` log-mel spectrogram (``flip`` does not apply)."""
        return audio_mel_module.log_mel_spectrogram(load_audio(ref, self.mel.sampling_rate), self.mel)


class TextToAudioDataModule(TextToImageDataModule):
    """Prompt + audio rows for a text-to-audio diffusion model (batches: module doc).

    Takes the arguments of :class:`TextToImageDataModule` except ``resolution`` and ``random_flip``, and:

    Args:
        model_name_or_path: an ``AudioLDMPipeline`` folder or alias (``tiny-audioldm``,
            ``cvssp/audioldm-s-full-v2``): its tokenizer encodes the prompts, its vocoder/VAE/UNet configs give
            the mel settings (sampling rate, hop, mel bins, the frame multiple).
        train, val, test, predict: data specs with a text-to-audio template (``T2A-Prompt-Audio``, ``AA_T2A``);
            audio paths are relative to the data file (or ``media_root``).
        duration: seconds per clip (cut or zero-padded at the end); default the UNet's ``sample_size`` worth
            (the length the pipeline generates by default: 5.12 s for AudioLDM-S, 0.64 s for the tiny one).
    """

    def __init__(self, *args: Any, duration: float | None = None, **kwargs: Any) -> None:
        # the CLI passes the parent's defaults of the image settings: only a changed one is an error
        defaults = inspect.signature(TextToImageDataModule.__init__).parameters
        for name in ("resolution", "random_flip"):
            if name in kwargs and kwargs[name] != defaults[name].default:
                raise TypeError(f"{name}: an image setting that {type(self).__name__} does not take")
        super().__init__(*args, **kwargs)
        self.duration = duration
        self.mel: audio_mel_module.MelSettings | None = None

    def load_processing(self) -> None:
        if self.tokenizer is not None:
            return
        super().load_processing()
        folder = resolve_model_path(self.hparams.model_name_or_path)
        if tokenizer_folder(folder) == folder:
            raise ValueError(
                f"{folder}: a text-to-audio model is an AudioLDM pipeline folder (model_index.json)"
            )
        self.mel = audio_mel_module.MelSettings.from_pipeline(folder, self.duration)

    def build_encoder(self) -> TextToAudioEncoder:  # type: ignore[override]
        return TextToAudioEncoder(self.tokenizer, self.max_length, self._spec_root, self._spec_source)

    def sample_check(self) -> Callable[[dict[str, Any]], None]:
        """Decode every clip of each row when the data is prepared, so a corrupt file is a bad row now."""
        return functools.partial(check_media, MediaLoader(sampling_rate=self.mel.sampling_rate))

    def new_report(self, source: str, total: int) -> DataReport:
        return PromptAudioReport(source, total, self.max_length)

    def row_noter(self, encoder: Any) -> Callable[[str, dict[str, Any], Sequence[Any]], str]:
        return functools.partial(_notes, encoder)

    def _fingerprint(self, rows: datasets.Dataset, spec: DataSpec, kind: str, formatter: Any) -> str:
        parts = {
            "base": super()._fingerprint(rows, spec, kind, formatter),  # rows, tokenizer, media checks ...
            "encoder": inspect.getsource(TextToAudioEncoder),
            "notes": [inspect.getsource(_notes), inspect.getsource(_same_clips)],
            "sampling_rate": self.mel.sampling_rate,  # clips are checked by decoding at this rate
        }
        return fingerprint_of(parts)

    def build_collator(self, kind: str) -> TextToAudioCollator:  # type: ignore[override]
        return TextToAudioCollator(
            kind,
            self.tokenizer.pad_token_id,
            self.max_length,
            self.mel,
            padding_side=self.tokenizer.padding_side,
        )
