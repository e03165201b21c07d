"""Progress output: lines when standard output is not a terminal, a steps-of-total rich bar when it is."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import lightning.pytorch as pl
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from aa_lightning.callbacks.progress import (
    LineProgressBar,
    StepsRichProgressBar,
    default_progress_bar,
    format_duration,
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def boring_trainer(bar: pl.Callback, tmp_path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        **kwargs,
    )


def test_the_bar_follows_the_stream():
    assert isinstance(default_progress_bar(Terminal()), StepsRichProgressBar)
    assert isinstance(default_progress_bar(io.StringIO()), LineProgressBar)


def test_rich_bar_of_a_max_steps_run_counts_steps_of_the_total(tmp_path):
    """BoringModel's 64 batches an epoch, 100 steps: one bar to 100 over two epochs, not ``Epoch 0/-2``."""
    bar = StepsRichProgressBar()
    seen: list[tuple[str, float, float]] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            task = bar.progress.tasks[bar.train_progress_bar_id]
            seen.append((task.description.strip(), task.completed, task.total))

    trainer = boring_trainer(bar, tmp_path, max_steps=100, limit_val_batches=0)
    trainer.callbacks.append(Watch())
    trainer.fit(BoringModel())
    assert trainer.max_epochs == -1 and trainer.current_epoch >= 1  # the case Lightning draws as "Epoch 0/-2"
    assert seen[0] == ("Step 1/100", 1, 100)
    assert seen[70] == ("Step 71/100", 71, 100)  # in the second epoch the bar goes on, it does not restart
    assert seen[-1] == ("Step 100/100", 100, 100)
    assert not any("Epoch" in description for description, _, _ in seen)


def test_rich_bar_of_an_epoch_run_keeps_epochs(tmp_path):
    bar = StepsRichProgressBar()
    boring_trainer(bar, tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=0).fit(BoringModel())
    assert bar.progress.tasks[bar.train_progress_bar_id].description.startswith("Epoch 1/1")


def test_line_bar_prints_every_n_steps(tmp_path):
    stream = io.StringIO()
    bar = LineProgressBar(every_n_seconds=0, every_n_steps=4, stream=stream)
    trainer = boring_trainer(bar, tmp_path, max_steps=10, accumulate_grad_batches=2, limit_val_batches=0)
    trainer.fit(BoringModel())
    lines = stream.getvalue().splitlines()
    assert lines[0] == "training: 10 optimizer steps from step 0"
    steps = [int(m.group(1)) for line in lines[1:-1] if (m := re.match(r"step (\d+)/10 ", line))]
    assert steps == [1, 4, 8]  # optimizer steps, not the 20 batches of accumulation
    assert re.fullmatch(r"done: step 10/10 \(100%\) \| [\d.]+ it/s \| \S+ elapsed", lines[-1])
    with pytest.raises(ValueError, match="every_n_seconds"):
        LineProgressBar(every_n_seconds=0, every_n_steps=0)


def test_format_duration():
    assert [format_duration(s) for s in (7, 125, 3723)] == ["7s", "2m05s", "1h02m03s"]


def test_piped_aa_fit_prints_progress_lines(repo_path, tmp_path):
    """What a log file of ``aa fit ... > log`` holds: step lines with loss, rate and ETA, validation lines."""
    args = ["fit", "--config", repo_path("configs", "tiny", "sft_t2t.yaml"), "--trainer.max_steps", "4"]
    args += ["--trainer.val_check_interval", "2", "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.limit_val_batches", "1", "--export.enabled", "false"]
    out = subprocess.run(
        [sys.executable, "-m", "aa_lightning.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        check=True,
        cwd=repo_path(),
    ).stdout
    assert "training: 4 optimizer steps from step 0" in out
    assert re.search(
        r"^step 1/4 \(25%\) \| epoch 0 \| train/loss [\d.]+ \| [\d.]+ it/s \| \S+ elapsed \| ETA \S+$",
        out,
        re.M,
    )
    assert re.search(r"^validation at step 2 \| val/loss [\d.]+ \| val/perplexity [\d.]+$", out, re.M)
    assert re.search(r"^done: step 4/4 \(100%\)", out, re.M)
    assert "Epoch" not in out


def test_aa_adds_one_progress_bar_unless_told_otherwise(repo_path, tmp_path):
    from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

    from aa_lightning.cli import build_cli

    base = [
        "--config",
        repo_path("configs", "tiny", "sft_t2t.yaml"),
        "--trainer.default_root_dir",
        str(tmp_path),
    ]

    def bars(*extra: str) -> list[ProgressBar]:
        trainer = build_cli([*base, *extra], run=False).trainer
        return [c for c in trainer.callbacks if isinstance(c, ProgressBar)]

    assert [type(b) for b in bars()] == [LineProgressBar]  # pytest's captured stdout is no terminal
    assert bars("--trainer.enable_progress_bar", "false") == []
    chosen = bars("--trainer.callbacks", "lightning.pytorch.callbacks.TQDMProgressBar")
    assert [type(b) for b in chosen] == [TQDMProgressBar]
