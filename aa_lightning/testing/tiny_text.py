"""Tiny random text models (Llama, Qwen2) on the shared tiny tokenizer."""

from __future__ import annotations

import os

from aa_lightning.testing.tiny_common import build_tiny_tokenizer, save_tiny_model, text_config_kwargs


def build_tiny_llama(save_dir: str | os.PathLike, seed: int = 0) -> str:
    """A 2-layer random LlamaForCausalLM with the tiny tokenizer, saved into ``save_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(**text_config_kwargs(len(tokenizer), tokenizer))
    return save_tiny_model(LlamaForCausalLM, config, tokenizer, save_dir, seed)


def build_tiny_qwen2(save_dir: str | os.PathLike, seed: int = 0) -> str:
    """A 2-layer random Qwen2ForCausalLM with the tiny tokenizer, saved into ``save_dir``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(**text_config_kwargs(len(tokenizer), tokenizer))
    return save_tiny_model(Qwen2ForCausalLM, config, tokenizer, save_dir, seed)
