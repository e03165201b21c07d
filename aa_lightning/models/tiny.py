"""Tiny random models of real architectures, saved like real checkpoints.

Tests and the quick demo configs use them: they load through exactly the same ``from_pretrained`` path as
a 7B model, so no test needs a mock of transformers. The tokenizer is a real byte-level BPE trained on
public text (``assets/train_tiny_tokenizer.py``) with a ChatML chat template.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

ASSETS = Path(__file__).parent / "assets"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer(extra_special_tokens: list[str] | None = None) -> PreTrainedTokenizerBase:
    """The shipped 2048-token byte-level BPE with ChatML specials (+ any media placeholder tokens)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(ASSETS / "tiny_bpe_tokenizer.json"),
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token=None,
        unk_token=None,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    if extra_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": extra_special_tokens})
    return tokenizer


def _text_config_kwargs(vocab_size: int, tokenizer: PreTrainedTokenizerBase) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def build_tiny_llama(save_dir: str | os.PathLike, seed: int = 0) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(**_text_config_kwargs(len(tokenizer), tokenizer))
    return _save(LlamaForCausalLM, config, tokenizer, save_dir, seed)


def build_tiny_qwen2(save_dir: str | os.PathLike, seed: int = 0) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(**_text_config_kwargs(len(tokenizer), tokenizer))
    return _save(Qwen2ForCausalLM, config, tokenizer, save_dir, seed)


def _save(model_class, config, tokenizer, save_dir, seed: int, processor=None) -> str:  # noqa: ANN001
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(save_dir)
    (processor or tokenizer).save_pretrained(save_dir)
    return str(save_dir)


def _multimodal(name: str) -> Callable[[str | os.PathLike, int], str]:
    """Builder of a tiny multimodal model (imported on use: that module imports this one)."""

    def build(save_dir: str | os.PathLike, seed: int = 0) -> str:
        from aa_lightning.models.tiny_multimodal import BUILDERS

        return BUILDERS[name](save_dir, seed)

    return build


TINY_BUILDERS: dict[str, Callable[[str | os.PathLike, int], str]] = {
    "tiny-llama": build_tiny_llama,
    "tiny-qwen2": build_tiny_qwen2,
    "tiny-llava": _multimodal("tiny-llava"),
    "tiny-qwen2-vl": _multimodal("tiny-qwen2-vl"),
    "tiny-qwen2-audio": _multimodal("tiny-qwen2-audio"),
}
