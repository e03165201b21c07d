"""What every tiny model shares: the tokenizer, the text-model shape and the save step.

Tests and the quick demo configs use tiny random models that load through exactly the same
``from_pretrained`` path as a 7B model, so no test needs a mock of transformers. The tokenizer is a real
byte-level BPE trained on public text (``assets/train_tiny_tokenizer.py``) with a ChatML chat template.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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


def text_config_kwargs(vocab_size: int, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The tiny text-model shape (2 layers, hidden 64, GQA 4/2), shared by the text and multimodal models."""
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


def save_tiny_model(
    model_class: Any,
    config: Any,
    tokenizer: PreTrainedTokenizerBase,
    save_dir: str | os.PathLike,
    seed: int,
    processor: Any = None,
) -> str:
    """Initialise ``model_class(config)`` from ``seed`` and save it with its tokenizer (or processor).

    The generation config gets the tokenizer's end and pad tokens: ``generate`` stops like a chat model's.
    """
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(save_dir)
    (processor or tokenizer).save_pretrained(save_dir)
    return str(save_dir)
