"""Text-to-audio latent diffusion (AudioLDM style) behind the interface the algorithms already use.

The same answer to "how well does this model explain this output" as :class:`TextToImageDiffusion`: per row
``-0.5 * mean((target - unet(x_t, t, text))^2)`` over the latent dims, count 1, at a VAE latent sample,
timestep and noise drawn from the row's ``noise_seed`` (:func:`~aa_lightning.models.diffusion.draw_row_noise`).
So the unchanged ``SFTModule`` trains the denoising loss and ``DPOModule`` with ``beta`` = Wallace et al.'s
``beta_dpo`` is Diffusion-DPO on audio pairs.

What differs from images (``diffusers.AudioLDMPipeline``, ``cvssp/audioldm-*``):

- the output is a log-mel spectrogram, batch key ``audio_mels`` ``(N, 1, frames, n_mels)`` float32 (time
  along the height, mel bins along the width: the layout the pipeline's VAE decodes and its vocoder reads,
  :mod:`aa_lightning.data.audio_mel` computes it);
- the text condition is the CLAP text model's projection (``text_embeds``), L2-normalised, fed to the UNet
  as its class embedding (``class_labels``; ``encoder_hidden_states=None``), as ``AudioLDMPipeline`` samples;
- a frozen ``SpeechT5HifiGan`` ``vocoder`` turns generated mels into 16 kHz waveforms.

Only the UNet trains; the VAE, text encoder and vocoder stay frozen and in eval mode. Saving writes an
``AudioLDMPipeline`` folder that ``diffusers.DiffusionPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aa_lightning.models.diffusion import OutputScores, TextToImageDiffusion

__all__ = ["AUDIOLDM_CLASS", "TextToAudioDiffusion", "is_audio_pipeline_folder"]

AUDIOLDM_CLASS = "AudioLDMPipeline"
COMPONENTS = ("unet", "vae", "text_encoder", "vocoder")
"""The weight-holding components, as ``TextToAudioDiffusion.state_dict()`` prefixes their keys."""
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "vocoder")


def is_audio_pipeline_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``model_index.json`` of an ``AudioLDMPipeline``."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return False
    with open(index) as f:
        return json.load(f).get("_class_name") == AUDIOLDM_CLASS


class TextToAudioDiffusion(TextToImageDiffusion):
    """A text-to-audio latent diffusion model: ``unet`` (trained); ``vae``, ``text_encoder``, ``vocoder`` frozen.

    Args:
        unet: a ``UNet2DConditionModel`` with a class embedding (``simple_projection``) of the text projection.
        vae: a 1-channel ``AutoencoderKL`` over log-mel spectrograms.
        text_encoder: a ``ClapTextModelWithProjection`` (its ``text_embeds`` condition the UNet).
        tokenizer, scheduler, noise_scheduler, name_or_path: as for :class:`TextToImageDiffusion`.
        vocoder: a ``SpeechT5HifiGan`` (mel -> waveform; its config gives sampling rate, hop and mel bins).
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        scheduler: Any,
        vocoder: nn.Module,
        noise_scheduler: Any = None,
        name_or_path: str = "",
    ) -> None:
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, noise_scheduler, name_or_path)
        self.vocoder = vocoder
        self.config.model_type = "audioldm"
        self.requires_grad_(True)
        self.train(self.training)

    # -- modes: only the UNet ever trains ----------------------------------------------------------------
    def train(self, mode: bool = True) -> TextToAudioDiffusion:
        super().train(mode)
        if getattr(self, "vocoder", None) is not None:  # not yet set while the parent's __init__ runs
            self.vocoder.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True) -> TextToAudioDiffusion:
        super().requires_grad_(requires_grad)
        if getattr(self, "vocoder", None) is not None:
            self.vocoder.requires_grad_(False)
        return self

    @property
    def sampling_rate(self) -> int:
        return int(self.vocoder.config.sampling_rate)

    # -- scoring -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The CLAP text projection, L2-normalised (``AudioLDMPipeline._encode_prompt``): ``(N, projection_dim)``.

        The pipeline always passes the attention mask (CLAP's text model is RoBERTa), so training does too."""
        device = next(self.text_encoder.parameters()).device
        mask = attention_mask.to(device) if attention_mask is not None else None
        embeds = self.text_encoder(input_ids.to(device), attention_mask=mask).text_embeds
        return nn.functional.normalize(embeds, dim=-1)

    def explain_outputs(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        audio_mels: torch.Tensor,
        noise_seed: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> OutputScores:
        """:meth:`score` of the clips' log-mel spectrograms (other batch tensors are ignored)."""
        return self.score(audio_mels, input_ids, noise_seed, attention_mask)

    def generate_outputs(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:  # type: ignore[override]
        """Waveforms for a prompt batch as ``{"audio", "sampling_rate"}`` (what the prediction writer saves as WAV)."""
        waves = super().generate_outputs(*args, **kwargs)
        return [{"audio": wave, "sampling_rate": self.sampling_rate} for wave in waves]

    def unet_conditioning(self, text: torch.Tensor) -> dict[str, Any]:
        """AudioLDM conditions through class embeddings on the normalised CLAP projection, no cross-attention
        (``explain_outputs`` scores ``audio_mels`` ``(N, 1, frames, n_mels)``, as the vocoder reads them)."""
        return {"encoder_hidden_states": None, "class_labels": text}

    # -- sampling ----------------------------------------------------------------------------------------
    def pipeline(self) -> Any:
        """An ``AudioLDMPipeline`` over these components (a fresh copy of the inference scheduler)."""
        from diffusers import AudioLDMPipeline

        pipe = AudioLDMPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=type(self.scheduler).from_config(self.scheduler.config),
            vocoder=self.vocoder,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def generate(  # type: ignore[override]
        self,
        prompts: list[str],
        num_inference_steps: int = 10,
        guidance_scale: float = 2.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        audio_length_in_s: float | None = None,
        negative_prompt: str | list[str] | None = None,
        **kwargs: Any,
    ) -> list[np.ndarray]:
        """One mono float32 waveform at :attr:`sampling_rate` per prompt (the UNet's mode is restored)."""
        out = self._sample(
            prompt=list(prompts),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            audio_length_in_s=audio_length_in_s,
            negative_prompt=negative_prompt,
            output_type="np",
            **kwargs,
        )
        return [np.asarray(a, dtype=np.float32) for a in out.audios]

    # -- persistence: an AudioLDMPipeline folder -------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        safe_serialization: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write an ``AudioLDMPipeline`` folder; ``state_dict`` (keys ``unet.*``, ``vae.*``,
        ``text_encoder.*``, ``vocoder.*``; a component may be left out, a given one is given whole) replaces
        the live weights in the files, as :func:`~aa_lightning.models.diffusion_pipeline_io.save_pipeline`."""
        from aa_lightning.models.diffusion_pipeline_io import _plain_names, write_component_weights

        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in (state_dict or {}).items():
            name, _, rest = key.partition(".")
            if name not in COMPONENTS or not rest:
                raise ValueError(f"state_dict key {key!r} is outside the components {COMPONENTS}")
            parts.setdefault(name, {})[rest] = tensor
        for name, weights in parts.items():
            expected = _plain_names(getattr(self, name))
            missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
            if missing or unexpected:
                raise ValueError(f"state_dict for {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.pipeline().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        for name, weights in parts.items():
            write_component_weights(
                getattr(self, name), Path(save_directory) / name, weights, safe_serialization
            )

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> TextToAudioDiffusion:
        """Load an ``AudioLDMPipeline`` folder (``dtype`` applies to every component)."""
        from diffusers import AudioLDMPipeline

        from aa_lightning.models.zero3_context import outside_zero3_init

        if not is_audio_pipeline_folder(folder):
            raise ValueError(f"{folder}: not an {AUDIOLDM_CLASS} folder (model_index.json's _class_name)")
        with outside_zero3_init():
            pipe = AudioLDMPipeline.from_pretrained(
                folder, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
            )
        return cls(**{name: getattr(pipe, name) for name in REQUIRED}, name_or_path=str(folder))
