"""The training DataLoader: resumes mid-epoch exactly, and tells each batch the token count of its step.

Lightning stores ``state_dict()`` of stateful train dataloaders in its checkpoints and calls
``load_state_dict`` on resume. The position saved is the number of batches the fit loop has *processed*
in the epoch (not what the prefetcher has pulled ahead), so the resumed run sees exactly the batches the
interrupted run had not trained on yet, in the same order (the shuffle depends only on seed and epoch).

Token-mean losses must divide by the labelled-token count of the whole optimizer step, known only after
the step's last micro-batch. The loader knows it before the first: the epoch's index order is fixed when
iteration starts, so it groups the coming batches into Lightning's accumulation windows and sums per-sample
label counts (read once from the encoded columns; no sample is loaded), then adds the window's count to
each batch's ``extra`` (keys in :mod:`aa_lightning.batch`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from aa_lightning.batch import IGNORE_INDEX, SAMPLE_INDEX, STEP_CHOSEN_LABEL_TOKENS, STEP_LABEL_TOKENS


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
        self.last_iteration: tuple[list[int], int] | None = None

    def epoch_indices(self) -> list[int]:
        """This rank's indices for the current epoch (before skipping a consumed prefix)."""
        return list(super().__iter__())

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()
        skipped = self.skip_samples if self.skip_epoch == self.epoch else 0
        if skipped:
            indices = indices[skipped:]
            self.skip_epoch, self.skip_samples = None, 0
        # what this iteration yields and how many samples of the epoch came before: the loader plans the
        # accumulation windows from it (the order is fixed only now: Lightning may create the loader's
        # iterator before it sets the epoch, and a single-process loader iterates its sampler lazily)
        self.last_iteration = (indices, skipped)
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


def scored_label_counts(data: Any, column: str) -> np.ndarray:
    """Per sample of a ``datasets.Dataset``: labelled positions after the causal shift (``labels[1:] != -100``).

    That is what the losses count (position 0 is never a target). Read from the Arrow column in one pass.
    """
    labels = data.with_format("arrow")[column]
    labels = labels.combine_chunks() if hasattr(labels, "combine_chunks") else labels
    lengths = pc.list_value_length(labels).to_numpy(zero_copy_only=False).astype(np.int64)
    scored = pc.list_flatten(labels).to_numpy(zero_copy_only=False) != IGNORE_INDEX
    starts = np.cumsum(lengths) - lengths
    scored[starts[lengths > 0]] = False
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return np.bincount(rows[scored], minlength=len(lengths))


def step_token_counts(data: Any, kind: str) -> dict[str, np.ndarray]:
    """Per-sample label counts behind each step-token key of :mod:`aa_lightning.batch` (none for prompts)."""
    if kind == "supervised":
        return {STEP_LABEL_TOKENS: scored_label_counts(data, "labels")}
    if kind == "preference":
        chosen = scored_label_counts(data, "chosen_labels")
        return {
            STEP_LABEL_TOKENS: chosen + scored_label_counts(data, "rejected_labels"),
            STEP_CHOSEN_LABEL_TOKENS: chosen,
        }
    return {}


def plan_step_tokens(
    batches: Sequence[Sequence[int]],
    counts: Mapping[str, np.ndarray],
    accumulate: int,
    first_batch: int = 0,
    epoch_batches: float = math.inf,
) -> list[dict[str, int]]:
    """For each batch, every key's count summed over the accumulation window the batch belongs to.

    Windows are Lightning's: the epoch's batch ``b`` (counted from the epoch start, so a resumed epoch
    starts at ``first_batch``) closes a window when ``(b + 1) % accumulate == 0`` or it is the epoch's last
    trained batch (``epoch_batches``, after ``limit_train_batches``). Batches past that limit are never
    trained; they get windows of their own.
    """
    windows: dict[tuple[int, bool], dict[str, int]] = {}
    keys = []
    for offset, batch in enumerate(batches):
        number = first_batch + offset
        key = (number // accumulate, number >= epoch_batches)
        window = windows.setdefault(key, dict.fromkeys(counts, 0))
        for name, per_sample in counts.items():
            window[name] += int(per_sample[list(batch)].sum()) if len(batch) else 0
        keys.append(key)
    return [windows[key] for key in keys]


class ResumableDataLoader(DataLoader):
    """DataLoader whose state is (epoch, batches processed); ``progress_fn`` reports the latter.

    With ``step_tokens`` (per-sample counts by batch key, see :func:`step_token_counts`) and ``schedule_fn``
    (returning the trainer's ``accumulate_grad_batches`` and the epoch's trained batch count), every batch's
    ``extra`` also holds the label-token counts of its accumulation window (:func:`plan_step_tokens`).
    """

    def __init__(
        self,
        *args: Any,
        progress_fn: Callable[[], tuple[int, int]] | None = None,
        step_tokens: Mapping[str, np.ndarray] | None = None,
        schedule_fn: Callable[[], tuple[int, float]] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.progress_fn = progress_fn
        self.step_tokens = dict(step_tokens or {})
        self.schedule_fn = schedule_fn

    def plans_step_tokens(self) -> bool:
        return bool(self.step_tokens) and self.schedule_fn is not None and self.batch_size is not None

    def step_token_plan(self) -> list[dict[str, int]]:
        """The window counts of the batches of the sampler's latest iteration, in order."""
        sampler, size = self.sampler, int(self.batch_size or 1)
        if not isinstance(sampler, ResumableSampler) or sampler.last_iteration is None:
            raise RuntimeError("step-token counts need a ResumableSampler that has started an iteration")
        indices, skipped = sampler.last_iteration
        batches = [indices[start : start + size] for start in range(0, len(indices), size)]
        if self.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        accumulate, epoch_batches = self.schedule_fn()  # type: ignore[misc]
        return plan_step_tokens(
            batches, self.step_tokens, max(int(accumulate), 1), skipped // size, epoch_batches
        )

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        if not self.plans_step_tokens() or not isinstance(self.sampler, ResumableSampler):
            return batches
        return self._with_step_tokens(batches)

    def _with_step_tokens(self, batches: Iterator[Any]) -> Iterator[Any]:
        """Adds each window count to its batch's ``extra`` as a ``(B,)`` tensor (see :mod:`aa_lightning.batch`)."""
        plan: Iterator[dict[str, int]] | None = None
        for batch in batches:
            if plan is None:  # the first batch is fetched: the sampler has fixed this iteration's order
                plan = iter(self.step_token_plan())
            counts = next(plan)
            extra = batch.setdefault("extra", {})
            index = extra.get(SAMPLE_INDEX)
            rows = int(index.shape[0]) if isinstance(index, torch.Tensor) else 1
            for key, count in counts.items():
                extra[key] = torch.full((rows,), count, dtype=torch.long)
            yield batch

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
