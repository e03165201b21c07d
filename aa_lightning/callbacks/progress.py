"""Progress that reads right wherever ``aa`` runs: a rich bar in a terminal, progress lines everywhere else.

Why: rich draws nothing when standard output is not a terminal (a log file, CI, ``nohup``), so a long run
printed nothing for many minutes; and its bar names the epoch, which for a ``max_steps`` run is ``Epoch 0/-2``
(Lightning sets ``max_epochs=-1``). :func:`default_progress_bar` picks :class:`StepsRichProgressBar` (the
whole run's optimizer steps as one bar, ``Step k/total``) for a terminal and :class:`LineProgressBar`
otherwise; ``aa`` adds it unless the config names a progress bar or ``trainer.enable_progress_bar: false``.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

__all__ = [
    "LineProgressBar",
    "StepsRichProgressBar",
    "default_progress_bar",
    "format_duration",
    "is_step_run",
]

# shown when a module puts none of its metrics on the progress bar (RL modules log prog_bar=False)
FALLBACK_METRICS = ("train/loss", "train/reward", "train/reward_mean", "train/score")


def is_step_run(trainer: pl.Trainer) -> bool:
    """Whether the run is bounded by ``max_steps`` alone (Lightning's ``max_epochs`` is then -1)."""
    return (trainer.max_steps or -1) > 0 and trainer.max_epochs in (None, -1)


def total_steps(trainer: pl.Trainer) -> int | None:
    """Optimizer steps the whole fit will take (``max_steps``, or epochs x steps per epoch); None if unknown."""
    if (trainer.max_steps or -1) > 0 and trainer.max_epochs in (None, -1):
        return int(trainer.max_steps)
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # an iterable dataset without a length, before its loader exists ...
        return None
    return int(total) if math.isfinite(total) else None


def format_duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m05s`` / ``7s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class StepsRichProgressBar(RichProgressBar):
    """Lightning's rich bar; a ``max_steps`` run gets one bar over all its optimizer steps, ``Step k/total``,
    that does not restart with every pass over the data (an epoch run keeps Lightning's epoch bars)."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self._trainer is not None and is_step_run(self.trainer):
            text = f"Step {self.trainer.global_step}/{self.trainer.max_steps}"
            return f"{text:{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_step_run(trainer) or self.is_disabled:
            return super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is None:
            self.train_progress_bar_id = self._add_task(trainer.max_steps, self._get_train_description(0))
            self._update(self.train_progress_bar_id, trainer.global_step)  # a resumed run starts where it was
        self.refresh()
        return None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not is_step_run(trainer) or self.is_disabled:
            return super().on_train_batch_end(trainer, pl_module, *args)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=self._get_train_description(0))
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
        return None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_step_run(trainer):
            super().on_train_epoch_end(trainer, pl_module)
        elif self.is_enabled:
            self._update_metrics(trainer, pl_module)


class LineProgressBar(ProgressBar):
    """Prints one progress line every ``every_n_seconds`` (and every ``every_n_steps`` optimizer steps when
    set): ``step 120/2000 (6%) | train/loss 1.234 | 2.10 it/s | 57s elapsed | ETA 14m55s``; a line after each
    validation with its metrics, and one when fit ends. Made for logs: nothing is redrawn, every line stays.

    Args:
        every_n_seconds: seconds between lines (the first step always prints).
        every_n_steps: also print every this many optimizer steps (0: by time only).
        stream: where the lines go (default: standard output).
    """

    def __init__(self, every_n_seconds: float = 30.0, every_n_steps: int = 0, stream: TextIO | None = None):
        super().__init__()
        if every_n_seconds <= 0 and every_n_steps <= 0:
            raise ValueError("LineProgressBar needs every_n_seconds > 0 or every_n_steps > 0")
        self.every_n_seconds = every_n_seconds
        self.every_n_steps = every_n_steps
        self.stream = stream
        self._enabled = True
        self._start = 0.0
        self._start_step = 0
        self._last_print = -math.inf
        self._last_step = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, file=self.stream or sys.stdout, flush=True, **kwargs)

    # -- the line ------------------------------------------------------------------------------------
    def metrics_text(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str = "train/") -> str:
        shown = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k.startswith(prefix)}
        if not shown and prefix == "train/":
            shown = {
                k: trainer.callback_metrics[k] for k in FALLBACK_METRICS if k in trainer.callback_metrics
            }
        parts = []
        for key, value in shown.items():
            value = value.item() if hasattr(value, "item") else value
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        return " | ".join(parts)

    def step_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool = False) -> str:
        step, total = trainer.global_step, total_steps(trainer)
        elapsed = time.monotonic() - self._start
        done = step - self._start_step
        rate = done / elapsed if elapsed > 0 else 0.0
        head = f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"
        parts = [head] if final else [head, f"epoch {trainer.current_epoch}"]  # the epoch count moved on
        metrics = self.metrics_text(trainer, pl_module)
        if metrics:
            parts.append(metrics)
        parts += [f"{rate:.2f} it/s", f"{format_duration(elapsed)} elapsed"]
        if total and rate > 0 and not final:
            parts.append(f"ETA {format_duration((total - step) / rate)}")
        return " | ".join(parts)

    # -- hooks ---------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._start_step = time.monotonic(), trainer.global_step
        self._last_step, self._last_print = trainer.global_step, -math.inf
        total = total_steps(trainer)
        self.print(
            f"training: {total if total else 'an unknown number of'} optimizer steps from step {trainer.global_step}"
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._last_step:  # a batch that only accumulated gradients
            return
        total = total_steps(trainer)
        if total and step >= total:  # the "done:" line of on_train_end says it
            self._last_step = step
            return
        now = time.monotonic()
        due = now - self._last_print >= self.every_n_seconds > 0 or self._last_print == -math.inf
        if due or (self.every_n_steps > 0 and step % self.every_n_steps == 0):
            self.print(self.step_line(trainer, pl_module))
            self._last_print = now
        self._last_step = step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = self.metrics_text(trainer, pl_module, prefix="val/")
        self.print(f"validation at step {trainer.global_step}" + (f" | {metrics}" if metrics else ""))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.print("done: " + self.step_line(trainer, pl_module, final=True))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = self.metrics_text(trainer, pl_module, prefix="test/")
        self.print("test done" + (f" | {metrics}" if metrics else ""))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.print(f"predict done: {sum(int(n) for n in trainer.num_predict_batches)} batches")


def default_progress_bar(stream: TextIO | None = None) -> ProgressBar:
    """The rich step bar when ``stream`` (default: standard output) is a terminal, else progress lines."""
    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    if _RICH_AVAILABLE and callable(isatty) and isatty():
        return StepsRichProgressBar()
    return LineProgressBar()
