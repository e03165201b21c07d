"""Tiny random LLaVA, Qwen2-VL and Qwen2-Audio models with real processors, built offline.

They exist so that tests and demo configs exercise the exact multimodal code path of the 7B models (the
real processor classes expand the media placeholders, the real model classes merge media features into
the token embeddings) in seconds on a CPU. Each is the shared tiny BPE tokenizer of
:mod:`aa_lightning.testing.tiny_common` plus the family's media tokens, a model of a few hundred thousand
parameters, and a processor assembled from real parts whose images are tiny (4-12 placeholder tokens each).

The chat template is ChatML where a message content may be a parts list; each media part renders as the
family's unexpanded placeholder (``<image>``, ``<|vision_start|><|image_pad|><|vision_end|>``, ...), which
the processor later expands to one token per media feature.
"""

from __future__ import annotations

import os

from aa_lightning.testing.tiny_common import build_tiny_tokenizer, save_tiny_model, text_config_kwargs

LLAVA_IMAGE = "<image>"
QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
QWEN_AUDIO_TOKENS = ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]
QWEN_AUDIO = "<|audio_bos|><|AUDIO|><|audio_eos|>"


def parts_chat_template(
    name: str, image: str | None = None, video: str | None = None, audio: str | None = None
) -> str:
    """ChatML over parts lists; a media kind the model cannot take raises at render time (not silently)."""

    def part(kind: str, text: str | None) -> str:
        if text is None:
            return f"{{% elif part['type'] == '{kind}' %}}{{{{ raise_exception('{name} takes no {kind} input') }}}}"
        return f"{{% elif part['type'] == '{kind}' %}}{text}"

    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'text' %}{{ part['text'] }}"
        + part("image", image)
        + part("video", video)
        + part("audio", audio)
        + "{% endif %}{% endfor %}{% endif %}"
        "{{ '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


def build_tiny_llava(save_dir: str | os.PathLike, seed: int = 0) -> str:
    """LLaVA: a 1-layer CLIP tower on 28x28 images (2x2 patches of 14 px -> 4 image tokens) + tiny Llama."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_tiny_tokenizer([LLAVA_IMAGE])
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text_config_kwargs(len(tokenizer), tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLIP CLS token, dropped by the "default" strategy
        chat_template=parts_chat_template("tiny-llava", image=LLAVA_IMAGE),
    )
    return save_tiny_model(
        LlavaForConditionalGeneration, config, tokenizer, save_dir, seed, processor=processor
    )


def build_tiny_qwen2_vl(save_dir: str | os.PathLike, seed: int = 0) -> str:
    """Qwen2-VL: 1-block vision tower, images resized to 56x56..56x112 px (4-8 tokens), videos too."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = build_tiny_tokenizer(QWEN_VISION_TOKENS)
    text = text_config_kwargs(len(tokenizer), tokenizer)
    # M-RoPE: the sections (temporal, height, width) sum to head_dim / 2 = 64 / 4 / 2 = 8
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_VISION_TOKENS}
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(
            depth=1,
            embed_dim=32,
            num_heads=2,
            mlp_ratio=2,
            hidden_size=text["hidden_size"],
            in_chans=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    pixels = {"min_pixels": 56 * 56, "max_pixels": 56 * 112}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels, cap_pixels_per_frame=True),
        tokenizer=tokenizer,
        chat_template=parts_chat_template("tiny-qwen2-vl", image=QWEN_IMAGE, video=QWEN_VIDEO),
    )
    return save_tiny_model(
        Qwen2VLForConditionalGeneration, config, tokenizer, save_dir, seed, processor=processor
    )


def build_tiny_qwen2_audio(save_dir: str | os.PathLike, seed: int = 0) -> str:
    """Qwen2-Audio: 1-layer Whisper-style encoder on 128 mel bins (about 25 audio tokens per second)."""
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    tokenizer = build_tiny_tokenizer(QWEN_AUDIO_TOKENS)
    config = Qwen2AudioConfig(
        text_config=dict(model_type="qwen2", **text_config_kwargs(len(tokenizer), tokenizer)),
        audio_config=dict(
            d_model=32,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            num_mel_bins=128,
            max_source_positions=1500,
        ),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    processor = Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16000),
        tokenizer=tokenizer,
        chat_template=parts_chat_template("tiny-qwen2-audio", audio=QWEN_AUDIO),
    )
    return save_tiny_model(
        Qwen2AudioForConditionalGeneration, config, tokenizer, save_dir, seed, processor=processor
    )
