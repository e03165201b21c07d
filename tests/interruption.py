"""A callback that interrupts a run after a given optimizer step, as a crash or a preemption would."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


class InterruptAfterStep(pl.Callback):
    """Raise on every rank once optimizer step ``step`` is behind us and its periodic checkpoint is written.

    Lightning runs ``ModelCheckpoint`` after the other callbacks, so the raise comes one batch later: the
    checkpoint of step ``step`` is on disk, the work of the next step is lost, as in a crash.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step > self.step:
            raise SystemExit(f"interrupted after step {self.step}")
