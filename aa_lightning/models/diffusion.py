"""Latent diffusion models (text-to-image: Stable Diffusion style; text-to-video: TextToVideoSD / ModelScope
style) behind the interface the algorithms already use.

Every SFT/preference algorithm asks a model "how well do you explain this output": per row a score (a sum
over scored units) and a count of units. A causal LM answers with the log-probability of the labels; a
diffusion model answers with the Gaussian log-likelihood of the noise at one noise level,

    score = -0.5 * mean((target - unet(x_t, t, text))^2)   over the latent dimensions, count = 1,

where the VAE latent sample, the timestep ``t`` and the noise are drawn from the row's ``noise_seed``. With this
score DPO's sigmoid loss is Diffusion-DPO (Wallace et al., arXiv:2311.12908) and SFT's loss is 0.5 * MSE, the
usual denoising loss. Chosen and rejected rows of a pair share a seed, and the policy and its frozen reference
(a second instance, called separately) see the same seeds, so they are scored at the same noise.

:class:`LatentDiffusion` holds all of that; a subclass only says how its media become latents:
:class:`TextToImageDiffusion` encodes ``pixel_values`` ``(N, 3, H, W)`` to ``(N, c, h, w)``,
:class:`TextToVideoDiffusion` encodes every frame of ``pixel_values_videos`` ``(N, F, 3, H, W)`` to
``(N, c, F, h, w)`` (the layout of ``UNet3DConditionModel``). Loading picks the class from the pipeline
folder's ``model_index.json`` ``_class_name`` (:func:`aa_lightning.models.loading.diffusion_class`).

Only the UNet trains; the VAE and the text encoder stay frozen and in eval mode (Stable Diffusion
fine-tuning as in diffusers' ``train_text_to_image.py``). Saving and loading write and read a diffusers
pipeline folder (:mod:`.diffusion_pipeline_io`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from aa_lightning.models.latent_diffusion import (
    PREDICTION_TYPES,
    DiffusionConfig,
    LatentDiffusion,
    OutputScores,
    draw_row_noise,
)

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "PREDICTION_TYPES",
    "DiffusionConfig",
    "LatentDiffusion",
    "OutputScores",
    "TextToImageDiffusion",
    "TextToVideoDiffusion",
    "draw_row_noise",
]


class TextToImageDiffusion(LatentDiffusion):
    """Text-to-image (Stable Diffusion style): ``pixel_values`` ``(N, 3, H, W)`` -> latents ``(N, c, h, w)``.

    The UNet is a ``UNet2DConditionModel``; samples and saves through ``StableDiffusionPipeline``.
    """

    def posterior(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vae_posterior(media)

    def explain_outputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        noise_seed: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> OutputScores:
        """Per row ``-0.5 * mean((target - prediction)^2)`` over the latent dims (float32), count 1.

        Gradients flow into the UNet only. Other batch tensors are accepted and ignored, so
        ``model(**model_inputs(batch))`` works on any text-to-image batch.
        """
        return self.score(pixel_values, input_ids, noise_seed, attention_mask)

    def trajectory_latent_shape(self) -> tuple[int, ...]:
        """``(C, h, w)``: the UNet's latent channels at its ``sample_size`` (the pipeline's default image size)."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet.config.in_channels), int(h), int(w))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """PIL images of final latents, decoded and post-processed as ``StableDiffusionPipeline`` does."""
        from diffusers.image_processor import VaeImageProcessor

        vae = self.vae
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        param = next(vae.parameters())
        pixels = vae.decode(latents.to(param.device, param.dtype) / vae.config.scaling_factor).sample
        return list(VaeImageProcessor(vae_scale_factor=scale).postprocess(pixels.float(), output_type="pil"))

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | list[str] | None = None,
        **kwargs: Any,
    ) -> list[Image.Image]:
        """PIL images for ``prompts`` (one each), sampled with the UNet in eval mode (its mode is restored)."""
        out = self._sample(
            prompt=list(prompts),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            height=height,
            width=width,
            negative_prompt=negative_prompt,
            output_type="pil",
            **kwargs,
        )
        return list(out.images)


class TextToVideoDiffusion(LatentDiffusion):
    """Text-to-video (ModelScope / TextToVideoSD style): a ``UNet3DConditionModel`` over the latents of an
    image VAE applied frame by frame.

    ``pixel_values_videos`` ``(N, F, 3, H, W)`` in ``[-1, 1]`` -> every frame through the VAE -> latents
    ``(N, c, F, h, w)`` (channels before frames, as ``TextToVideoSDPipeline`` and the 3D UNet take them). The
    score is the same ``-0.5 * MSE`` over all latent dims (channels, frames, pixels), count 1: a clip is one
    scored unit, and each row's VAE draw, timestep and noise come from its seed as for images. Samples and
    saves through ``TextToVideoSDPipeline``.
    """

    media_key = "pixel_values_videos"
    pipeline_class = "TextToVideoSDPipeline"
    model_type = "text-to-video-sd"

    def posterior(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if media.ndim != 5:
            raise ValueError(
                f"{self.media_key} must be (N, F, 3, H, W) videos, got shape {tuple(media.shape)}"
            )
        n, frames = media.shape[:2]
        mean, std = self.vae_posterior(media.flatten(0, 1))  # (N * F, c, h, w), frame-major per video

        def layout(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(0, (n, frames)).permute(0, 2, 1, 3, 4).contiguous()  # (N, c, F, h, w)

        return layout(mean), layout(std)

    def explain_outputs(
        self,
        input_ids: torch.Tensor,
        pixel_values_videos: torch.Tensor,
        noise_seed: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> OutputScores:
        """Per row ``-0.5 * mean((target - prediction)^2)`` over ``(c, F, h, w)`` (float32), count 1."""
        return self.score(pixel_values_videos, input_ids, noise_seed, attention_mask)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        if not getattr(self.unet, "_supports_gradient_checkpointing", False):
            raise ValueError(
                f"{type(self.unet).__name__} does not support gradient checkpointing in diffusers "
                "(UNet3DConditionModel has no checkpointed blocks); set gradient_checkpointing: false"
            )
        super().gradient_checkpointing_enable(gradient_checkpointing_kwargs)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        num_frames: int = 16,
        num_inference_steps: int = 25,
        guidance_scale: float = 9.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | list[str] | None = None,
        **kwargs: Any,
    ) -> list[list[Image.Image]]:
        """Per prompt a list of ``num_frames`` PIL frames, sampled with the UNet in eval mode."""
        from PIL import Image

        out = self._sample(
            prompt=list(prompts),
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            height=height,
            width=width,
            negative_prompt=negative_prompt,
            output_type="np",
            **kwargs,
        )
        videos = out.frames  # (B, F, H, W, 3) floats in [0, 1]
        return [
            [Image.fromarray((frame.clip(0, 1) * 255).round().astype("uint8")) for frame in video]
            for video in videos
        ]
