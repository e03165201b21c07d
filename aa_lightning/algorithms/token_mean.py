"""Token-mean losses over a whole optimizer step, however the step is split (TRL's ``num_items_in_batch``).

A token mean per micro-batch weighs each token by one over its micro-batch's token count, so with gradient
accumulation or several ranks the objective becomes a mean of means that favours the tokens of short
micro-batches. :class:`StepTokenMean` makes each micro-batch return ``sum_tokens(loss) * divisor / N``:
``N`` is the labelled-token count of the whole step (every micro-batch of the accumulation window on
every rank) and ``divisor`` undoes what the training stack divides by (Lightning: ``accumulate_grad_batches``;
DDP and DeepSpeed: the world size, by
averaging gradients). The step's gradient is then exactly ``grad(sum of the step's token losses) / N``.

``N`` must be known at the window's first micro-batch: the training loader plans the windows ahead and
puts this rank's count in ``batch["extra"]`` (:mod:`aa_lightning.batch`); it is summed across ranks once
per window.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from aa_lightning.algorithms.zero3 import deepspeed_engine_of
from aa_lightning.batch import EXTRA

__all__ = ["StepTokenMean", "closes_step", "loss_divisor"]


def loss_divisor(trainer: pl.Trainer) -> int:
    """What the returned loss's gradient gets divided by before the optimizer sees it: Lightning's
    ``accumulate_grad_batches`` and the ranks' gradient averaging. (DeepSpeed's engine would divide by its
    accumulation steps once more; :class:`~aa_lightning.strategies.CPUDeepSpeedStrategy` turns that off, and
    :class:`~aa_lightning.algorithms.base.AlignModule` refuses Lightning's plain DeepSpeed strategy with
    accumulation at start-up.)"""
    return int(trainer.accumulate_grad_batches) * int(trainer.world_size)


def closes_step(trainer: pl.Trainer) -> bool:
    """Whether the micro-batch being trained is the last of its optimizer step.

    DeepSpeed's engine decides its own accumulation boundary; otherwise it is Lightning's rule (every
    ``accumulate_grad_batches`` batches of the epoch, and the epoch's last batch).
    """
    engine = deepspeed_engine_of(trainer)
    if engine is not None:
        return bool(engine.is_gradient_accumulation_boundary())
    return not trainer.fit_loop._should_accumulate()


class StepTokenMean:
    """Normalises one token-summed loss by the labelled tokens of the optimizer step; reports step means.

    Per training micro-batch: ``loss = token_sum * self.scale(trainer, batch, tokens)``, then
    ``self.add(trainer, tokens, name=value, ...)`` with detached sums to report; ``add`` returns them summed
    over the step's micro-batches and ranks (plus ``tokens``, the step's actual token count) on the step's
    last micro-batch, else None. A batch without a planned count (a loader of your own) is normalised by
    its own token count summed across ranks: exact without accumulation, a mean over micro-batches with it.

    Args:
        count_key: the ``batch["extra"]`` key holding this rank's planned count for the window.
    """

    def __init__(self, count_key: str) -> None:
        self.count_key = count_key
        self.total: torch.Tensor | None = None  # the open window's token count over all ranks
        self.planned: torch.Tensor | None = None  # this rank's planned count for it
        self.seen: torch.Tensor | None = None  # this rank's tokens so far in it
        self.sums: dict[str, torch.Tensor] = {}
        self._warned: set[str] = set()

    def planned_tokens(self, batch: dict[str, Any]) -> torch.Tensor | None:
        counts = (batch.get(EXTRA) or {}).get(self.count_key)
        return counts[0] if isinstance(counts, torch.Tensor) and counts.numel() else None

    def scale(self, trainer: pl.Trainer, batch: dict[str, Any], tokens: torch.Tensor) -> torch.Tensor:
        """Factor turning this micro-batch's token-summed loss into its share of the step's token mean."""
        planned = self.planned_tokens(batch)
        if planned is None:
            if trainer.accumulate_grad_batches > 1:
                self._warn_once(
                    "unplanned",
                    f"the training batches carry no {self.count_key!r} count (a loader other than the "
                    "datamodule's?): with accumulate_grad_batches > 1 each micro-batch's token mean is "
                    "averaged, so tokens of short micro-batches weigh more",
                )
            total = self._sum_over_ranks(trainer, tokens.detach().to(torch.long))
            return loss_divisor(trainer) / (trainer.accumulate_grad_batches * total.clamp(min=1))
        if self.total is None:
            self._check_deepspeed_windows(trainer)
            self.planned = planned.to(tokens.device, torch.long)
            self.total = self._sum_over_ranks(trainer, self.planned)
        return loss_divisor(trainer) / self.total.clamp(min=1)

    def add(
        self, trainer: pl.Trainer, tokens: torch.Tensor, **sums: torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        """Accumulates this micro-batch; on the step's last one returns the step's sums over all ranks."""
        tokens = tokens.detach().to(torch.long)
        self.seen = tokens if self.seen is None else self.seen + tokens
        for name, value in {"tokens": tokens, **sums}.items():
            value = value.detach().to(torch.float32 if value.device.type == "mps" else torch.float64)
            self.sums[name] = value if name not in self.sums else self.sums[name] + value
        if not closes_step(trainer):
            return None
        if self.planned is not None and not torch.equal(self.seen, self.planned):
            self._warn_once(  # any rank: the windows may disagree on one rank only
                "mismatch",
                f"an optimizer step held {int(self.seen)} labelled tokens on rank {trainer.global_rank} but its "
                f"batches announced {int(self.planned)} ({self.count_key}): the loader's windows and the "
                "trainer's disagree (or rows were dropped at collation), so that step's token mean is off",
                every_rank=True,
            )
        names = list(self.sums)
        totals = self._sum_over_ranks(trainer, torch.stack([self.sums[n] for n in names]))
        self.total = self.planned = self.seen = None
        self.sums = {}
        return dict(zip(names, totals.unbind()))

    @staticmethod
    def _sum_over_ranks(trainer: pl.Trainer, value: torch.Tensor) -> torch.Tensor:
        if trainer.world_size == 1:
            return value
        return trainer.strategy.reduce(value.clone(), reduce_op="sum")

    def _check_deepspeed_windows(self, trainer: pl.Trainer) -> None:
        engine = deepspeed_engine_of(trainer)
        accumulate, batches = trainer.accumulate_grad_batches, trainer.num_training_batches
        if engine is None or accumulate == 1 or math.isinf(batches) or batches % accumulate == 0:
            return
        if trainer.max_epochs == 1:
            return
        self._warn_once(
            "deepspeed",
            f"DeepSpeed carries accumulation windows across epoch ends, and accumulate_grad_batches="
            f"{accumulate} does not divide the {batches} batches per epoch: after the first epoch the "
            "token means are normalised by the loader's windows, not the engine's (choose a batch count "
            "per epoch that accumulate_grad_batches divides to make them exact)",
        )

    def _warn_once(self, key: str, message: str, every_rank: bool = False) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3) if every_rank else rank_zero_warn(message)
