"""A DataLoader that resumes mid-epoch at the exact batch where a checkpoint was taken.

Lightning stores ``state_dict()`` of stateful train dataloaders in its checkpoints and calls
``load_state_dict`` on resume. The position saved is the number of batches the fit loop has *processed*
in the epoch (not what the prefetcher has pulled ahead), so the resumed run sees exactly the batches the
interrupted run had not trained on yet, in the same order (the shuffle depends only on seed and epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Seeded, epoch-dependent shuffling (single or multi-process) that can skip a consumed prefix.

    Subclassing ``DistributedSampler`` tells Lightning not to replace it with its own sampler.
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.skip_epoch: int | None = None
        self.skip_samples = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.skip_epoch == self.epoch and self.skip_samples:
            indices = indices[self.skip_samples :]
            self.skip_epoch, self.skip_samples = None, 0
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """DataLoader whose state is (epoch, batches processed); ``progress_fn`` reports the latter."""

    def __init__(self, *args: Any, progress_fn: Callable[[], tuple[int, int]] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.progress_fn = progress_fn

    def state_dict(self) -> dict[str, Any]:
        if self.progress_fn is None:
            return {}
        epoch, batches = self.progress_fn()
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self.sampler
        if not state or not isinstance(sampler, ResumableSampler) or self.batch_size is None:
            return
        if state["batches"] * self.batch_size >= sampler.num_samples:
            return  # the epoch was complete; Lightning starts the next one
        sampler.skip_epoch = state["epoch"]
        sampler.skip_samples = state["batches"] * self.batch_size
