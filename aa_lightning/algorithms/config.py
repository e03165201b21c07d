"""Small config dataclasses shared by the algorithm modules (they appear as YAML sections).

Modules coerce them once, in ``__init__``, with :func:`as_config`: from Python they arrive as dataclasses,
from YAML or the command line the hyper-parameters hold plain dicts, and every reader must see the same typed
object whatever the entry point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from aa_lightning.config_coercion import as_config

__all__ = ["GenerationConfig", "LoraConfig", "OptimConfig", "as_config"]


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then a cosine, linear or constant schedule (per optimizer step).

    Args:
        lr: peak learning rate.
        weight_decay: decoupled weight decay (not applied to biases and norm weights).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_ratio: share of the total optimizer steps spent warming up (used when warmup_steps is None).
        warmup_steps: warm-up steps; overrides warmup_ratio.
        scheduler: shape of the decay after warm-up.
        min_lr_ratio: the decay ends at lr * min_lr_ratio.
    """

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0


@dataclass
class LoraConfig:
    """LoRA adapters through peft (only the adapters train; export merges them unless merge_on_export=False).

    Args:
        r: adapter rank.
        alpha: scaling numerator (scale = alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module names, or "all-linear".
        merge_on_export: write merged full weights (True) or the adapter only (False).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: "all-linear")
    merge_on_export: bool = True


@dataclass
class GenerationConfig:
    """Sampling settings for rollouts, sample logging and ``aa predict``.

    Token-generating models read the first five; models that generate by denoising (diffusion) read
    ``num_inference_steps``, ``guidance_scale`` and ``seed`` (the modules pass them through untouched), and
    their RL rollouts ``eta``: the noise weight of the stochastic DDIM steps whose log-probs are trained
    (0 would be deterministic DDIM, no density; 1 is DDPM-like, DDPO's default).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    eta: float = 1.0


# Lightning loads checkpoints with ``weights_only=True``; the hyper-parameters saved in them hold these
# plain dataclasses, so they are allow-listed (nothing else from a checkpoint is unpickled).
torch.serialization.add_safe_globals([OptimConfig, LoraConfig, GenerationConfig])
