"""Families that sample their own multi-step trajectories: the hook the on-policy RL modules ask for.

A causal LM's episode is its response tokens, and ``generate`` plus the logits of one forward give the
log-probability of each. A denoising model (latent diffusion) generates by a chain of stochastic steps
``x_T -> ... -> x_0``; read as an MDP (DDPO, Black et al. 2023, arXiv:2305.13301) every step is an action whose
log-probability is the density of ``x_{t-1}`` under the step's Gaussian. Such a family answers both questions
itself, so the RL modules stay the same: they ask :func:`trajectory_family` and, when it answers, treat the
steps as the response "tokens" (one per step, all kept). Nothing here names a modality.

The family implements two methods:

* ``sample_trajectories(input_ids, attention_mask, generation, seed, stochastic) -> SampledTrajectories``:
  the steps of one trajectory per row (batch-first tensors, everything needed to score the steps again),
  the sampler's own step log-probs, and the decoded outputs (what the rewards see, e.g. ``PIL`` images);
* ``trajectory_log_probs(input_ids, attention_mask, timesteps, trajectory) -> StepLogProbs``: the log-prob ``(N, T)`` of
  each recorded step under the family's CURRENT weights (with gradients), and the step distributions'
  entropy.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = ["SampledTrajectories", "StepLogProbs", "trajectory_family"]


class StepLogProbs(NamedTuple):
    """Per step of each row: ``log_probs`` ``(N, T)`` float32 and the step distribution's ``entropy`` ``(N, T)``."""

    log_probs: torch.Tensor
    entropy: torch.Tensor


class SampledTrajectories(NamedTuple):
    """What a family's sampler returns for a prompt batch of ``N`` rows."""

    trajectory: dict[str, torch.Tensor]  # batch-first (N, ...): the family's record of its steps
    timesteps: torch.Tensor  # (N, T) int64: which step each action is (the rollout's response ids)
    log_probs: torch.Tensor  # (N, T) float32: the sampler's step log-probs (0 when not stochastic)
    outputs: list[Any]  # one decoded output per row


def trajectory_family(model: nn.Module) -> nn.Module | None:
    """The family under DeepSpeed/DDP/peft wrappers when it samples its own trajectories, else ``None``."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    family = model.get_base_model() if hasattr(model, "get_base_model") else model
    sampler = getattr(family, "sample_trajectories", None)
    return family if callable(sampler) and callable(getattr(family, "trajectory_log_probs", None)) else None
