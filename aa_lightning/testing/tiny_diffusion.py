"""Tiny random Stable-Diffusion-style text-to-image and text-to-video pipelines, built offline.

Real diffusers classes (UNet2DConditionModel, AutoencoderKL, DDPM/DDIM schedulers) and a real CLIPTextModel on
the shared tiny tokenizer, saved with ``StableDiffusionPipeline.save_pretrained``: tests and demo configs load
it through exactly the path a Stable Diffusion 1.5 folder takes. Images are 32x32 (the VAE downsamples x2,
latents are 4x16x16); the whole pipeline has about a million parameters and builds in seconds.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from aa_lightning.testing.tiny_common import build_tiny_tokenizer

TINY_SD_RESOLUTION = 32
TINY_SD_MAX_LENGTH = 16

# Stable Diffusion 1.x's noise schedule: scaled-linear betas over 1000 training steps.
SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)


def build_tiny_sd(save_dir: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon") -> str:
    """A random tiny text-to-image pipeline saved into ``save_dir`` (a diffusers pipeline folder).

    The folder's ``scheduler`` is a DDIMScheduler (few-step sampling); training draws its noise with a
    DDPMScheduler built from that config, as diffusers' training scripts do.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = build_tiny_tokenizer()
    tokenizer.model_max_length = TINY_SD_MAX_LENGTH
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_SD_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=16,
    )
    vae, text_encoder, scheduler = tiny_vae_text_encoder_scheduler(
        tokenizer, TINY_SD_RESOLUTION, prediction_type
    )
    pipeline = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(save_dir)
    return str(save_dir)


TINY_T2V_RESOLUTION = 32
TINY_T2V_FRAMES = 4


def build_tiny_t2v(save_dir: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon") -> str:
    """A random tiny text-to-video pipeline (``TextToVideoSDPipeline``, ModelScope's layout) in ``save_dir``.

    A ``UNet3DConditionModel`` (channels 32/64, one layer a block, temporal attention and convolutions) over
    the latents of the same tiny image VAE and CLIP text encoder as ``tiny-sd``; clips are 4 frames of 32x32
    (latents 4 x 4 x 16 x 16). The scheduler is a DDIMScheduler as in ``tiny-sd``.
    """
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    tokenizer = build_tiny_tokenizer()
    tokenizer.model_max_length = TINY_SD_MAX_LENGTH
    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        sample_size=TINY_T2V_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae, text_encoder, scheduler = tiny_vae_text_encoder_scheduler(
        tokenizer, TINY_T2V_RESOLUTION, prediction_type
    )
    pipeline = TextToVideoSDPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
    )
    pipeline.save_pretrained(save_dir)
    return str(save_dir)


def tiny_vae_text_encoder_scheduler(
    tokenizer: Any, resolution: int, prediction_type: str
) -> tuple[Any, Any, Any]:
    """The tiny image VAE (x2 down, 4 latent channels), CLIP text encoder and DDIM scheduler every tiny
    latent-diffusion pipeline shares (built after the UNet, in this order, from the seeded RNG)."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TINY_SD_MAX_LENGTH,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        **SD_SCHEDULE,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return vae, text_encoder, scheduler
