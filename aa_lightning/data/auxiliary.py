"""A training loader that yields an auxiliary data stream next to the main one.

Each batch is ``{main_key: main_batch, auxiliary_key: auxiliary_batch}`` (e.g. prompts with a supervised
stream, which the RL modules read as ``{"prompt": ..., "ptx": ...}``). The MAIN loader alone defines the
epoch (its length, its shuffling epoch, its resume position); the auxiliary loader cycles through its own
epochs as long as needed. Which auxiliary batch comes with a main batch depends only on how many main
batches came before it in the run, so a resumed run pairs exactly the batches the uninterrupted run would
have. (Lightning's ``max_size_cycle`` over a dict of loaders instead lets the longer stream set the epoch,
replays the shorter one in the same order and cannot resume it mid-cycle.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aa_lightning.data.loader import ResumableDataLoader, ResumableSampler

__all__ = ["WithAuxiliaryStream"]


class WithAuxiliaryStream:
    """``main`` batches, each paired with the next batch of a cycling ``auxiliary`` loader.

    Args:
        main: the loader that sets the epoch (its state is the checkpointed state of this loader).
        auxiliary: a loader with a :class:`ResumableSampler`; it is restarted on its next epoch when it runs out.
        main_key, auxiliary_key: the keys of the two batches in each yielded dict.
    """

    def __init__(
        self, main: ResumableDataLoader, auxiliary: ResumableDataLoader, main_key: str, auxiliary_key: str
    ) -> None:
        if not isinstance(auxiliary.sampler, ResumableSampler) or auxiliary.batch_size is None:
            raise TypeError("the auxiliary loader needs a ResumableSampler and a batch_size")
        if len(auxiliary) == 0:
            raise ValueError(f"the {auxiliary_key!r} data stream has no batch on this rank")
        self.main, self.auxiliary = main, auxiliary
        self.main_key, self.auxiliary_key = main_key, auxiliary_key

    @property
    def sampler(self) -> Any:
        """The main sampler: Lightning calls its ``set_epoch`` at each epoch start."""
        return self.main.sampler

    def __len__(self) -> int:
        return len(self.main)

    def first_batch_number(self) -> int:
        """Main batches the run has consumed before the first one this iteration yields."""
        sampler = self.main.sampler
        number = sampler.epoch * len(self.main)
        if (
            isinstance(sampler, ResumableSampler)
            and sampler.skip_epoch == sampler.epoch
            and self.main.batch_size
        ):
            number += sampler.skip_samples // self.main.batch_size
        return number

    def auxiliary_batches(self, start: int) -> Iterator[Any]:
        """Auxiliary batches from the ``start``-th one of the run on, epoch after epoch."""
        sampler: ResumableSampler = self.auxiliary.sampler  # type: ignore[assignment]
        epoch, skip = divmod(start, len(self.auxiliary))
        while True:
            sampler.set_epoch(epoch)
            sampler.skip_epoch, sampler.skip_samples = epoch, skip * int(self.auxiliary.batch_size or 0)
            yield from self.auxiliary
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        auxiliary = self.auxiliary_batches(self.first_batch_number())
        for batch in self.main:
            yield {self.main_key: batch, self.auxiliary_key: next(auxiliary)}

    # the resume position is the main loader's; the auxiliary position follows from it
    def state_dict(self) -> dict[str, Any]:
        return self.main.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state)
