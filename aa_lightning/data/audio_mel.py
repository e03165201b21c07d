"""Waveform -> the log-mel spectrogram an AudioLDM pipeline's VAE encodes and its vocoder reads.

An ``AudioLDMPipeline`` folder holds no feature extractor: the mel settings are those AudioLDM was trained
with (``audioldm/utils.py`` default config of Liu et al.; the HiFi-GAN/Tacotron-2 ``TacotronSTFT``), and the
ones a folder states are read from its ``vocoder/config.json``:

- sampling rate: ``vocoder.sampling_rate`` (16 kHz);
- hop: the vocoder's total upsampling, ``prod(upsample_rates)`` (160 samples = 10 ms): one mel frame per hop;
- mel bins: ``vocoder.model_in_dim`` (64);
- window and FFT: 1024 samples, Hann, centred with reflect padding (AudioLDM's ``STFT.transform``); mel
  filters from 0 to 8 kHz (``sampling_rate / 2``) with the Slaney scale and Slaney area normalisation (what
  ``librosa.filters.mel`` gives by default, and AudioLDM uses); MAGNITUDE spectrogram (``power=1``);
- ``log(clamp(mel, min=1e-5))`` (``dynamic_range_compression``);
- the waveform is first centred and scaled to a peak of 0.5 (AudioLDM's ``normalize_wav``), then cut or
  zero-padded at the end to the fixed duration; of the ``samples // hop + 1`` centred frames the first
  ``samples // hop`` are kept (AudioLDM's ``target_length``).

Computed with ``torchaudio.transforms.MelSpectrogram`` (its ``norm="slaney", mel_scale="slaney"`` filters are
librosa's). Layout ``(1, frames, n_mels)``: time along the height, as ``AudioLDMPipeline`` decodes
(``vae.decode(latents)`` -> ``(N, 1, frames, n_mels)``, then ``vocoder(mel.squeeze(1))``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["MelSettings", "log_mel_spectrogram"]

AUDIOLDM_N_FFT = 1024
AUDIOLDM_LOG_FLOOR = 1e-5


@dataclass(frozen=True)
class MelSettings:
    """How waveforms become the model's log-mels (module doc); ``frames`` per clip of ``duration`` seconds."""

    sampling_rate: int = 16000
    hop_length: int = 160
    n_mels: int = 64
    n_fft: int = AUDIOLDM_N_FFT
    f_min: float = 0.0
    f_max: float = 8000.0
    duration: float = 10.24
    frame_multiple: int = 1  # frames must be a multiple of this (the VAE's and the UNet's downsampling)

    def __post_init__(self) -> None:
        if self.n_fft < self.hop_length:
            raise ValueError(f"n_fft {self.n_fft} is shorter than the hop {self.hop_length}")
        if self.duration <= 0:
            raise ValueError(f"duration must be positive seconds, got {self.duration}")
        if self.frames < 1 or self.frames % self.frame_multiple:
            good = self.frame_multiple * self.hop_length / self.sampling_rate
            raise ValueError(
                f"duration {self.duration} s gives {self.frames} mel frames; the model needs a multiple of "
                f"{self.frame_multiple} (choose a multiple of {good:g} s)"
            )

    @property
    def samples(self) -> int:
        return int(round(self.duration * self.sampling_rate))

    @property
    def frames(self) -> int:
        return self.samples // self.hop_length

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_pipeline(cls, folder: str | os.PathLike, duration: float | None = None) -> MelSettings:
        """The settings of an ``AudioLDMPipeline`` folder (its vocoder, VAE and UNet configs)."""

        def config(name: str) -> dict[str, Any]:
            path = os.path.join(folder, name, "config.json")
            if not os.path.isfile(path):
                raise ValueError(f"{folder}: no {name}/config.json (not an AudioLDM pipeline folder?)")
            with open(path) as f:
                return json.load(f)

        vocoder, vae, unet = config("vocoder"), config("vae"), config("unet")
        rate = int(vocoder["sampling_rate"])
        hop = int(math.prod(vocoder["upsample_rates"]))
        multiple = 2 ** (len(vae["block_out_channels"]) - 1) * 2 ** (len(unet["block_out_channels"]) - 1)
        default_duration = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1) * hop / rate
        return cls(
            sampling_rate=rate,
            hop_length=hop,
            n_mels=int(vocoder["model_in_dim"]),
            f_max=rate / 2,
            duration=float(duration if duration is not None else default_duration),
            frame_multiple=multiple,
        )


_TRANSFORMS: dict[MelSettings, Any] = {}


def _transform(settings: MelSettings) -> Any:
    import torchaudio

    if settings not in _TRANSFORMS:
        _TRANSFORMS[settings] = torchaudio.transforms.MelSpectrogram(
            sample_rate=settings.sampling_rate,
            n_fft=settings.n_fft,
            win_length=settings.n_fft,
            hop_length=settings.hop_length,
            f_min=settings.f_min,
            f_max=settings.f_max,
            n_mels=settings.n_mels,
            power=1.0,
            center=True,
            pad_mode="reflect",
            norm="slaney",
            mel_scale="slaney",
        )
    return _TRANSFORMS[settings]


def fixed_length(waveform: np.ndarray, settings: MelSettings) -> np.ndarray:
    """AudioLDM's ``normalize_wav`` (centred, peak 0.5), then cut or zero-padded at the end to the duration."""
    wav = np.asarray(waveform, dtype=np.float32)
    wav = wav - wav.mean()
    wav = 0.5 * wav / (np.abs(wav).max() + 1e-8)
    wav = wav[: settings.samples]
    if len(wav) < settings.samples:
        wav = np.pad(wav, (0, settings.samples - len(wav)))
    return wav


def log_mel_spectrogram(waveform: np.ndarray, settings: MelSettings) -> torch.Tensor:
    """``(1, frames, n_mels)`` float32 log-mel of a mono waveform at ``settings.sampling_rate`` (module doc)."""
    wav = torch.from_numpy(fixed_length(waveform, settings))
    mel = _transform(settings)(wav)  # (n_mels, samples // hop + 1)
    mel = torch.log(torch.clamp(mel, min=AUDIOLDM_LOG_FLOOR))
    return mel[:, : settings.frames].T.unsqueeze(0).contiguous().to(torch.float32)
