"""The one minibatch update loop of PPO, GRPO and Safe-RLHF.

Each pass shuffles the rollout (seeded per rollout and pass) into ``num_mini_batches`` minibatches, grouped
by ``gradient_accumulation_steps`` into optimizer updates. The algorithms only supply the loss of one
minibatch; the weights handed to it are taken over the whole accumulation group (tokens or sequences of all
its minibatches, tokens over all ranks), so splitting a step into minibatches does not change the objective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from aa_lightning.algorithms.rl.metrics import MetricAccumulator
from aa_lightning.algorithms.rl.rollout import Rollout

__all__ = ["MinibatchUpdatesMixin", "MinibatchWeights"]


@dataclass(frozen=True)
class MinibatchWeights:
    """How much one minibatch weighs in its accumulation group."""

    token: torch.Tensor  # its response tokens / the group's tokens per rank
    sequence: float  # its sequences / the group's sequences
    last: bool  # closes the group (the optimizer steps after it)
    minibatch: float = 1.0  # 1 / the group's minibatches (each minibatch weighs the same: GRPO's ``bnpo``)


class MinibatchUpdatesMixin:
    """Mixed into :class:`~aa_lightning.algorithms.rl.module.OnlineRLModule`; uses its engine plumbing."""

    def minibatch_groups(self, n: int, seed_offset: int) -> list[list[torch.Tensor]]:
        """A seeded shuffle of ``range(n)`` split into ``num_mini_batches`` minibatches, grouped for accumulation."""
        num_mb = self.num_mini_batches
        if n < num_mb:
            raise ValueError(f"a rollout of {n} sequences cannot be split into num_mini_batches={num_mb}")
        generator = torch.Generator().manual_seed(self.rollout_seed(seed_offset))
        perm = torch.randperm(n, generator=generator) if num_mb > 1 else torch.arange(n)
        chunks = list(perm.tensor_split(num_mb))
        accum = self.gradient_accumulation_steps
        return [chunks[i : i + accum] for i in range(0, num_mb, accum)]

    def run_updates(
        self,
        rollout: Rollout,
        passes: int,
        minibatch_loss: Callable[[Rollout, MinibatchWeights], torch.Tensor],
        stats: MetricAccumulator,
    ) -> None:
        """``passes`` passes over the rollout's minibatch groups, one backward per minibatch and one optimizer
        update per group; ``minibatch_loss(minibatch, weights)`` returns the (already weighted) loss."""
        mask = rollout.response_mask
        for p in range(passes):
            for group in self.minibatch_groups(len(rollout), seed_offset=p + 1):
                group_tokens = self.tokens_per_rank(torch.stack([mask[idx].sum() for idx in group]).sum())
                group_seqs = sum(len(idx) for idx in group)
                for i, idx in enumerate(group):
                    last = i == len(group) - 1
                    self.start_minibatch()
                    mb = rollout.select(idx)
                    weights = MinibatchWeights(
                        mb.response_mask.sum() / group_tokens, len(idx) / group_seqs, last, 1.0 / len(group)
                    )
                    self.backward_minibatch(minibatch_loss(mb, weights), last_in_group=last)
                self.optimizer_update(stats)
