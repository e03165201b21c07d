"""A few lines at the end of ``aa fit``: where the run's files went and its final metrics.

Why: after a long log a new user should not have to know Lightning's folder layout to find the checkpoint,
the Hugging Face export or the TensorBoard logs, nor scroll back for the last losses. The summary is printed
in ``teardown``, after every callback's ``on_fit_end`` (so the export exists when it is named), which
Lightning calls only when fit completed (a failed or interrupted run prints nothing here).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from aa_lightning.callbacks.hf_export import HFExportCallback

__all__ = ["RunSummary", "final_metrics"]


def final_metrics(metrics: Mapping[str, Any], limit: int = 8) -> list[tuple[str, float]]:
    """The scalar ones of ``metrics`` (a trainer's ``callback_metrics``), losses and validation metrics first,
    at most ``limit``."""
    scalars = []
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            scalars.append((name, float(value)))
        elif isinstance(value, (int, float)):
            scalars.append((name, float(value)))
    # losses and val/* are what a reader looks for; the rest keeps its logged order
    scalars.sort(key=lambda item: (not item[0].endswith("loss"), not item[0].startswith("val/")))
    return scalars[:limit]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class RunSummary(pl.Callback):
    """Prints the run's checkpoint, export and TensorBoard folders and its final metrics when fit ends.

    Args:
        enabled: set False to print nothing.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._start: float | None = None
        self._start_step = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()
        self._start_step = trainer.global_step

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled or self._start is None:
            return
        if trainer.interrupted:  # Lightning calls teardown hooks after a completed fit only; kept as a guard
            return
        self._print(self.render(trainer))
        self._start = None

    @rank_zero_only
    def _print(self, text: str) -> None:
        print(text, flush=True)

    def render(self, trainer: pl.Trainer) -> str:
        """The summary text (rank 0 prints it)."""
        elapsed = time.monotonic() - (self._start or time.monotonic())
        steps = trainer.global_step - self._start_step
        lines = [
            "",
            f"run summary: {steps} optimizer step(s) in {_duration(elapsed)} (global step {trainer.global_step}, "
            f"epoch {trainer.current_epoch})",
        ]
        metrics = final_metrics(trainer.callback_metrics)
        if metrics:
            lines.append("  final metrics: " + " | ".join(f"{n} {v:.4g}" for n, v in metrics))
        for path in self.checkpoints(trainer):
            lines.append(f"  checkpoint:    {path}   (continue: --ckpt_path last)")
        for path in self.exports(trainer):
            lines.append(f"  export:        {path}   (aa chat {path}; from_pretrained loads it)")
        for folder in self.tensorboard_dirs(trainer):
            lines.append(f"  tensorboard:   tensorboard --logdir {folder}")
        return "\n".join(lines)

    @staticmethod
    def checkpoints(trainer: pl.Trainer) -> list[str]:
        out = []
        for callback in trainer.checkpoint_callbacks:
            path: Any = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
            if path and os.path.exists(path):
                out.append(path)
        return out

    @staticmethod
    def exports(trainer: pl.Trainer) -> list[str]:
        return [
            cb.target(trainer)
            for cb in trainer.callbacks  # type: ignore[attr-defined]
            if isinstance(cb, HFExportCallback) and cb.enabled and os.path.isdir(cb.target(trainer))
        ]

    @staticmethod
    def tensorboard_dirs(trainer: pl.Trainer) -> list[str]:
        return [
            os.path.join(logger.save_dir, logger.name)
            for logger in trainer.loggers
            if isinstance(logger, TensorBoardLogger) and logger.save_dir
        ]
