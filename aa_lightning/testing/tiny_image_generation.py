"""A tiny random Emu3 (autoregressive text -> image over discrete VQ tokens) with its real processor, offline.

Emu3 keeps image tokens IN the language model's vocabulary: the VQ-VAE codebook index ``i`` is the BPE token
``<|visual token {i:06d}|>``, an image is ``h`` rows of ``w`` visual tokens each closed by the end-of-line
token ``<|extra_200|>``, wrapped as ``<|image start|>{h}*{w}<|image token|> ... <|extra_201|><|image end|>``.
So training on image outputs is plain causal-LM training on ``input_ids`` and ``outputs.logits`` (the
algorithms' :func:`~aa_lightning.algorithms.logprobs.causal_lm_log_probs`) — no separate image head.

The tiny model: the shared tiny BPE tokenizer plus Emu3's special tokens and a 64-entry codebook, the tiny
text-model shape (2 layers, hidden 64), and a VQ-VAE with the real 8x spatial downsampling (four stages of
32 channels; GroupNorm needs 32) so the processor's fixed ``downsample_ratio = 8`` holds: a 32x32 image is
4x4 codes = 4 x (4 + 1) = 20 tokens.
"""

from __future__ import annotations

import os

from aa_lightning.testing.tiny_common import ASSETS, save_tiny_model, text_config_kwargs

#: codebook entries of the tiny VQ-VAE (= the number of ``<|visual token ...|>`` tokens).
TINY_EMU3_CODEBOOK = 64
#: side in pixels of the tiny model's images (4 x 4 codes); also the processor's ``image_area`` side.
TINY_EMU3_RESOLUTION = 32
#: Emu3's named special tokens (the tokenizer attributes that ``Emu3Processor`` reads).
EMU3_SPECIALS = {
    "image_token": "<image>",
    "boi_token": "<|image start|>",
    "eoi_token": "<|image end|>",
    "image_wrapper_token": "<|image token|>",
    "eof_token": "<|extra_201|>",
}
EMU3_EOL = "<|extra_200|>"


def visual_token(index: int) -> str:
    return f"<|visual token {index:06d}|>"


def build_tiny_emu3_tokenizer(codebook_size: int = TINY_EMU3_CODEBOOK):
    """The tiny BPE + a BOS (Emu3's processor prepends one), Emu3's specials and the visual tokens."""
    from transformers import PreTrainedTokenizerFast

    from aa_lightning.testing.tiny_common import CHATML_TEMPLATE

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(ASSETS / "tiny_bpe_tokenizer.json"),
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        unk_token=None,
        extra_special_tokens=dict(EMU3_SPECIALS),
    )
    visual = [visual_token(i) for i in range(codebook_size)]
    tokenizer.add_special_tokens({"additional_special_tokens": [EMU3_EOL, *visual]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_emu3(save_dir: str | os.PathLike, seed: int = 0) -> str:
    """Emu3: tiny Llama-style LM over text + 64 visual tokens, a 4-stage VQ-VAE on 32x32 images."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3Processor

    tokenizer = build_tiny_emu3_tokenizer()
    text = text_config_kwargs(len(tokenizer), tokenizer)
    text.update(attention_dropout=0.0, tie_word_embeddings=False)
    vq = dict(
        codebook_size=TINY_EMU3_CODEBOOK,
        embed_dim=4,
        latent_channels=4,
        base_channels=32,
        channel_multiplier=[1, 1, 1, 1],  # 2**3 = 8x downsampling, Emu3's
        num_res_blocks=1,
        attn_resolutions=[],
        temporal_downsample_factor=2,
        hidden_size=32,
    )
    config = Emu3Config(vq_config=vq, text_config=text, vocabulary_map=tokenizer.get_vocab())
    pixels = TINY_EMU3_RESOLUTION**2
    image_processor = Emu3ImageProcessor(min_pixels=pixels, max_pixels=pixels, spatial_factor=8)
    processor = Emu3Processor(image_processor=image_processor, tokenizer=tokenizer)
    return save_tiny_model(
        Emu3ForConditionalGeneration, config, tokenizer, save_dir, seed, processor=processor
    )
