"""A tiny random Janus (autoregressive text -> image with a SEPARATE image head) and its real processor, offline.

Unlike Emu3 (:mod:`.tiny_image_generation`), Janus keeps image codes OUT of the language model's vocabulary:
a VQ-VAE code enters the LM through ``generation_embeddings`` + ``generation_aligner`` and is predicted by
``generation_head`` (a codebook-sized classifier), while the text ``lm_head`` never sees image positions.
Image-mode ``generate`` prompts with ``{bos}<|User|>: {prompt}\\n\\n<|Assistant|>:<begin_of_image>`` (the chat
template, then the processor's ``generation_mode="image"``) and samples ``vision_config.num_image_tokens``
codes with classifier-free guidance (the unconditional branch keeps only BOS and BOI).

The tiny model: the shared tiny BPE tokenizer (adding BOS, as Janus's Llama tokenizer does) plus Janus's
three special tokens, the tiny text-model shape (2 layers, hidden 64), a 64-entry codebook and a VQ-VAE of
four 32-channel stages (GroupNorm needs 32 channels; three downsamplings = 8x), so a 32x32 image is 4x4 =
16 codes. The understanding tower (SigLIP-style, 8-pixel patches on 32x32 images) is as small as its config
allows; it fixes ``vq_config.num_patches = image_size // patch_size = 4``, the grid ``decode`` expects.
"""

from __future__ import annotations

import os

from aa_lightning.testing.tiny_common import ASSETS, save_tiny_model, text_config_kwargs

#: codebook entries of the tiny VQ-VAE (= the classes of ``generation_head``).
TINY_JANUS_CODEBOOK = 64
#: side in pixels of the tiny model's images (the image processor's ``size``): 4 x 4 codes.
TINY_JANUS_RESOLUTION = 32
#: codes per image (``vision_config.num_image_tokens``, what image-mode ``generate`` samples).
TINY_JANUS_CODES = (TINY_JANUS_RESOLUTION // 8) ** 2
#: Janus's named special tokens (the tokenizer attributes that ``JanusProcessor`` reads).
JANUS_SPECIALS = {
    "image_token": "<image_placeholder>",
    "boi_token": "<begin_of_image>",
    "eoi_token": "<end_of_image>",
}
#: Janus's conversation format (``<|User|>: ...\n\n<|Assistant|>:``) over parts lists, text parts only.
JANUS_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|User|>: ' }}{% else %}{{ '<|Assistant|>: ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Assistant|>:' }}{% endif %}"
)


def build_tiny_janus_tokenizer():
    """The tiny BPE with a BOS it adds itself (the CFG branch keeps it) and Janus's image tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(ASSETS / "tiny_bpe_tokenizer.json"),
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        unk_token=None,
        add_bos_token=True,
        extra_special_tokens=dict(JANUS_SPECIALS),
    )


def build_tiny_janus(save_dir: str | os.PathLike, seed: int = 0) -> str:
    """Janus: tiny Llama LM, 64-code VQ-VAE on 32x32 images (16 codes), 1-layer vision tower."""
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusImageProcessor,
        JanusProcessor,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
    )

    tokenizer = build_tiny_janus_tokenizer()
    text = text_config_kwargs(len(tokenizer), tokenizer)
    text.update(attention_dropout=0.0)
    hidden = text["hidden_size"]
    side = TINY_JANUS_RESOLUTION
    vision = JanusVisionConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=side,
        patch_size=8,
        mlp_ratio=2.0,
        projection_dim=hidden,  # the understanding aligner feeds the LM
        depth=2,
        num_image_tokens=TINY_JANUS_CODES,
    )
    vq = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=TINY_JANUS_CODEBOOK,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1, 1, 1, 1],  # three downsamplings: 8x
        num_res_blocks=1,
        projection_dim=hidden,  # generation_aligner's output: the LM's input width
        image_token_embed_dim=hidden,  # generation_head's input: the LM's hidden states
        num_hidden_layers=2,
    )
    config = JanusConfig(
        text_config=LlamaConfig(**text),
        vision_config=vision,
        vq_config=vq,
        image_token_id=tokenizer.convert_tokens_to_ids(JANUS_SPECIALS["image_token"]),
    )
    # Janus-Pro's preprocessing: pixels in [-1, 1] (mean = std = 0.5), the longer side resized, padded square
    image_processor = JanusImageProcessor(
        size={"height": side, "width": side}, min_size=4, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=JANUS_CHAT_TEMPLATE,
        num_image_tokens=TINY_JANUS_CODES,
    )
    path = save_tiny_model(
        JanusForConditionalGeneration, config, tokenizer, save_dir, seed, processor=processor
    )
    _write_generation_config(path, tokenizer)
    return path


def _write_generation_config(path: str, tokenizer) -> None:
    """What Janus checkpoints' ``generation_config.json`` holds for image mode: BOS and pad (the CFG branch),
    ``generation_kwargs.boi_token_id`` and the guidance scale."""
    from transformers import GenerationConfig

    config = GenerationConfig(  # a fresh one: a config "from the model config" drops unknown keys on load
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        generation_kwargs={"boi_token_id": tokenizer.convert_tokens_to_ids(JANUS_SPECIALS["boi_token"])},
        guidance_scale=5.0,
    )
    config.save_pretrained(path)
