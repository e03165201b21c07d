"""A tiny random AudioLDM-style text-to-audio pipeline, built offline.

The classes of ``cvssp/audioldm-s-full-v2``: a ``UNet2DConditionModel`` conditioned through its class
embedding (``class_embed_type="simple_projection"``, concatenated to the time embedding) on the CLAP text
projection (``ClapTextModelWithProjection``), a 1-channel ``AutoencoderKL`` over log-mel spectrograms laid out
``(N, 1, frames, n_mels)`` and a ``SpeechT5HifiGan`` vocoder, saved with ``AudioLDMPipeline.save_pretrained``;
the tokenizer is the shared tiny BPE (:mod:`.tiny_common`). The audio settings are AudioLDM's: 16 kHz, a hop of
160 samples (the vocoder upsamples 10 x 16), 64 mel bins, so the datamodule's log-mel features are the real
model's. Clips are 0.64 s (64 frames; latents 4 x 32 x 32); about 0.5 M parameters, built in seconds.
"""

from __future__ import annotations

import os

import torch

from aa_lightning.testing.tiny_common import build_tiny_tokenizer

TINY_AUDIOLDM_MAX_LENGTH = 16
TINY_AUDIOLDM_SECONDS = 0.64
TINY_AUDIOLDM_FRAMES = 64

# AudioLDM's schedule (cvssp/audioldm-s-full-v2 scheduler/scheduler_config.json): scaled-linear betas.
AUDIOLDM_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear"
)


def build_tiny_audioldm(save_dir: str | os.PathLike, seed: int = 0) -> str:
    """A random tiny text-to-audio pipeline saved into ``save_dir`` (a diffusers ``AudioLDMPipeline`` folder)."""
    from diffusers import AudioLDMPipeline, AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import (
        ClapTextConfig,
        ClapTextModelWithProjection,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    tokenizer = build_tiny_tokenizer()
    tokenizer.model_max_length = TINY_AUDIOLDM_MAX_LENGTH
    torch.manual_seed(seed)
    projection_dim = 32
    unet = UNet2DConditionModel(
        sample_size=TINY_AUDIOLDM_FRAMES // 2,
        in_channels=8,
        out_channels=8,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=(16, 32),  # no text states: AudioLDM's attention blocks attend to themselves
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=projection_dim,
        class_embeddings_concat=True,
    )
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=8,
        sample_size=TINY_AUDIOLDM_FRAMES,
    )
    text_encoder = ClapTextModelWithProjection(
        ClapTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            # RoBERTa-style positions count from pad_token_id + 1
            max_position_embeddings=TINY_AUDIOLDM_MAX_LENGTH + tokenizer.pad_token_id + 1,
            projection_dim=projection_dim,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=64,
            sampling_rate=16000,
            upsample_initial_channel=16,
            upsample_rates=[10, 16],
            upsample_kernel_sizes=[20, 32],
            resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3]],
            normalize_before=False,
            initializer_range=0.1,  # the default 0.01 gives a random vocoder a near-silent output
        )
    )
    scheduler = DDIMScheduler(**AUDIOLDM_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipeline = AudioLDMPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        vocoder=vocoder.eval(),
    )
    pipeline.save_pretrained(save_dir)
    return str(save_dir)
