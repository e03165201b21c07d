"""Evaluation sums over the distinct samples of a val/test epoch, exact on any number of ranks.

Under DDP or DeepSpeed, Lightning gives every rank a ``DistributedSampler`` that REPEATS a few samples
when the evaluation set does not split evenly, so that all ranks run the same number of batches (a rank
that stopped early would leave the others waiting in a collective). Sums reduced over ranks then count
those samples twice: 3 validation rows on 2 ranks are evaluated as 4. Here every row is stored with its
dataset index (``batch["extra"]["sample_index"]``, which the data layer adds), the rows of all ranks are
gathered when the epoch's result is computed, and each index counts once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from aa_lightning.batch import EXTRA, SAMPLE_INDEX

__all__ = ["UniqueSampleSums", "sample_indices"]


def sample_indices(batch: Mapping[str, Any], rows: int) -> torch.Tensor:
    """The dataset index of each of the batch's ``rows`` rows; -1 (always counted) where the batch has none."""
    index = (batch.get(EXTRA) or {}).get(SAMPLE_INDEX)
    if isinstance(index, torch.Tensor) and index.numel() == rows:
        return index.reshape(-1).long()
    return torch.full((rows,), -1, dtype=torch.long)


class UniqueSampleSums(Metric):
    """Per-column sums over distinct samples (by dataset index) of everything added this epoch, all ranks.

    ``update(index, {name: (B,) values})`` adds one row per sample; ``compute()`` returns ``{name: sum}`` and
    ``rows`` (the number of distinct samples). A repeated index (a sample the distributed sampler handed out
    twice) is counted once; rows with a negative index are always counted. Values are kept in float64.
    """

    full_state_update = False

    def __init__(self, names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not names:
            raise ValueError("UniqueSampleSums needs at least one column name")
        self.names = list(names)
        # flat 1-D states: a rank that saw no rows contributes an empty tensor, which concatenates with anything
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, index: torch.Tensor, values: Mapping[str, torch.Tensor]) -> None:  # type: ignore[override]
        missing = [n for n in self.names if n not in values]
        if missing:
            raise KeyError(f"missing columns {missing}; expected {self.names}")
        columns = torch.stack([values[n].detach().to(torch.float64).reshape(-1) for n in self.names], dim=1)
        index = index.reshape(-1).long().to(columns.device)
        if index.numel() != columns.shape[0]:
            raise ValueError(f"{index.numel()} sample indices for {columns.shape[0]} rows")
        self.index.append(index)
        self.values.append(columns.reshape(-1))

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        width = len(self.names)
        index = (
            dim_zero_cat(self.index)
            if len(self.index)
            else torch.zeros(0, dtype=torch.long, device=self.device)
        )
        values = (
            dim_zero_cat(self.values).reshape(-1, width)
            if len(self.values)
            else torch.zeros(0, width, dtype=torch.float64, device=self.device)
        )
        keep = index < 0
        known = ~keep
        if known.any():
            positions = known.nonzero().squeeze(1)
            unique, inverse = torch.unique(index[known], return_inverse=True)
            first = torch.full((unique.numel(),), index.numel(), dtype=torch.long, device=index.device)
            first = first.scatter_reduce(0, inverse, positions, reduce="amin")
            keep[first] = True
        sums = values[keep].sum(dim=0)
        out = {name: sums[i] for i, name in enumerate(self.names)}
        out["rows"] = keep.sum().to(torch.float64)
        return out
