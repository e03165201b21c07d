"""Per-row noise seeds of diffusion batches: a function of (global seed, sample, epoch), nothing else.

A diffusion model scores a row at a noise and timestep drawn from the row's ``noise_seed`` (see
:mod:`aa_lightning.models.diffusion`). Drawing the seeds from the RNG of whichever process collates would
make them depend on the rank, the DataLoader worker and the batch a sample lands in, so the same global batch
would be a different objective on 1 and 2 processes, and a resumed run would draw other noise than the
uninterrupted one. Hashing ``(PL_GLOBAL_SEED, sample_index, epoch)`` instead gives every sample its own noise
each epoch, the same on every strategy; both rows of a preference pair share their sample's seed. Validation
batches keep epoch 0, so their loss compares across epochs at the same noise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from aa_lightning.batch import EXTRA, NOISE_SEED, SAMPLE_INDEX

__all__ = ["NoiseSeedsPerEpoch", "row_noise_seeds"]

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def row_noise_seeds(sample_indices: Sequence[int], epoch: int = 0, base: int | None = None) -> torch.Tensor:
    """``(B,)`` int64 seeds in ``[0, 2**62)``; ``base`` defaults to ``PL_GLOBAL_SEED`` (``seed_everything``)."""
    if base is None:
        base = int(os.environ.get("PL_GLOBAL_SEED", "0"))
    root = _splitmix64(base & _MASK64)
    seeds = [_splitmix64(_splitmix64(root ^ int(i)) ^ int(epoch)) & ((1 << 62) - 1) for i in sample_indices]
    return torch.tensor(seeds, dtype=torch.int64)


class NoiseSeedsPerEpoch:
    """Mixed into a diffusion DataModule: training batches get the seeds of their epoch (the collator, which
    cannot know the epoch in a worker process, writes those of epoch 0)."""

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)  # type: ignore[misc]
        trainer = getattr(self, "trainer", None)
        if not isinstance(batch, dict) or NOISE_SEED not in batch or trainer is None or not trainer.training:
            return batch
        index = (batch.get(EXTRA) or {}).get(SAMPLE_INDEX)
        if index is None or trainer.current_epoch == 0:
            return batch
        seeds = row_noise_seeds(index.tolist(), epoch=trainer.current_epoch)
        rows = batch[NOISE_SEED].shape[0]
        batch[NOISE_SEED] = seeds.repeat(rows // len(seeds)).to(batch[NOISE_SEED].device)
        return batch
