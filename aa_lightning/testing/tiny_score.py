"""Tiny score models (``tiny-qwen2-score``, ...): a tiny model of a family plus a seeded, bias-free score head.

A frozen reward or cost model must have a trained head (:class:`~aa_lightning.models.ScoreModel` refuses a
plain language model), so tests and demo configs that need "some reward model of this family" point at one of
these: the head is random but fixed, written in the format a trained export has (the family's
``*ForSequenceClassification`` where transformers has one, else backbone + ``score_head.safetensors``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

SCORED_FAMILIES = ("tiny-llama", "tiny-qwen2", "tiny-llava", "tiny-qwen2-vl", "tiny-qwen2-audio", "tiny-emu3")


def score_builder(base_alias: str) -> Callable[[str | os.PathLike, int], str]:
    """``build(save_dir, seed)`` for ``<base_alias>-score``: the base model with a head drawn ``N(0, 0.1)``."""

    def build(save_dir: str | os.PathLike, seed: int = 0) -> str:
        from aa_lightning.models.loading import load_pretrained_models

        torch.manual_seed(seed)
        model, tokenizer, processor = load_pretrained_models(
            base_alias, score_model=True, new_score_head=True, score_head_init_std=0.1
        )
        model.save_pretrained(str(save_dir))
        if processor is not None:
            processor.save_pretrained(str(save_dir))
        tokenizer.save_pretrained(str(save_dir))
        return str(save_dir)

    return build


TINY_SCORE_BUILDERS = {f"{alias}-score": score_builder(alias) for alias in SCORED_FAMILIES}
