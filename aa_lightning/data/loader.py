"""A DataLoader that resumes mid-epoch at the exact batch where a checkpoint was taken.

Lightning stores ``state_dict()`` of stateful train dataloaders in its checkpoints and calls
``load_state_dict`` on resume. The position saved is the number of batches the fit loop has *processed*
in the epoch (not what the prefetcher has pulled ahead), so the resumed run sees exactly the batches the
interrupted run had not trained on yet, in the same order (the shuffle depends only on seed and epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Seeded, epoch-dependent shuffling (single or multi-process) that can skip a consumed prefix.

    Subclassing ``DistributedSampler`` tells Lightning not to replace it with its own sampler.
    """

    def __init__(
        self, dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> None:
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

    def epoch_indices(self) -> list[int]:
        """This rank's indices for the current epoch (before skipping a consumed prefix)."""
        return list(super().__iter__())

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()
        if self.skip_epoch == self.epoch and self.skip_samples:
            indices = indices[self.skip_samples :]
            self.skip_epoch, self.skip_samples = None, 0
        return iter(indices)


class LengthGroupedSampler(ResumableSampler):
    """Shuffled like :class:`ResumableSampler`, then sorted longest-first inside mega-batches, so each batch holds
    samples of similar length and pads little.

    The epoch's seeded permutation is cut into mega-batches of ``batch_size x world size x mega_batches``
    samples; each is sorted by ``lengths``; ranks then take every ``world size``-th index as usual, so every
    global batch spans consecutive sorted samples. The order still depends only on seed and epoch (exact
    resume), and every sample is seen once per epoch. Batches of one mega-batch run from long to short.
    """

    def __init__(
        self,
        dataset: Dataset,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        mega_batches: int = 50,
    ) -> None:
        super().__init__(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        if len(lengths) != len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"{len(lengths)} lengths for {len(dataset)} samples")  # type: ignore[arg-type]
        if batch_size < 1 or mega_batches < 1:
            raise ValueError("batch_size and mega_batches must be >= 1")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.mega_batches = mega_batches

    def epoch_indices(self) -> list[int]:
        n = len(self.lengths)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        mega = self.batch_size * self.num_replicas * self.mega_batches
        grouped: list[int] = []
        for start in range(0, n, mega):
            grouped += sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
        if self.drop_last:
            grouped = grouped[: self.total_size]
        elif len(grouped) < self.total_size:  # pad like DistributedSampler so every rank gets num_samples
            padding = self.total_size - len(grouped)
            grouped += (grouped * -(-padding // max(len(grouped), 1)))[:padding]
        return grouped[self.rank : self.total_size : self.num_replicas]


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
