"""Steady steps: objects alive after setup are frozen out of the garbage collector during training.

A full collection walks every object of the process (~0.5M after loading a model, the frameworks and a
dataset): one training step that lands on it takes several times the median. ``AlignModule`` collects once
and freezes them at the start of training, and unfreezes at the end.
"""

from __future__ import annotations

import gc

import lightning.pytorch as pl
from quick_training import quiet_trainer

from aa_lightning.algorithms import OptimConfig, SFTModule
from aa_lightning.data import DataSpec, TextToTextDataModule


class FreezeProbe(pl.Callback):
    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.counts.append(gc.get_freeze_count())


def test_setup_objects_are_frozen_during_training_only(tmp_path, repo_path) -> None:
    gc.unfreeze()
    spec = DataSpec(repo_path("configs", "data", "alpaca_200.json"), "Alpaca", size=4)
    data = TextToTextDataModule("tiny-qwen2", train=spec, max_length=64, batch_size=2)
    module = SFTModule("tiny-qwen2", optim=OptimConfig(lr=1e-3, warmup_steps=0, scheduler="constant"))
    probe = FreezeProbe()
    trainer = quiet_trainer(2, default_root_dir=str(tmp_path), callbacks=[probe])
    trainer.fit(module, datamodule=data)
    # the model's parameters (and everything else alive at the start) are in the permanent generation
    assert len(probe.counts) == 2 and min(probe.counts) > 10_000
    assert gc.get_freeze_count() == 0


class FailAtFirstBatch(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        assert gc.get_freeze_count() > 10_000  # frozen by then
        raise RuntimeError("a failing step")


def test_a_failed_fit_unfreezes_too(tmp_path, repo_path) -> None:
    """Lightning skips on_train_end when training raises; the callback's on_exception must unfreeze."""
    gc.unfreeze()
    spec = DataSpec(repo_path("configs", "data", "alpaca_200.json"), "Alpaca", size=4)
    data = TextToTextDataModule("tiny-qwen2", train=spec, max_length=64, batch_size=2)
    module = SFTModule("tiny-qwen2", optim=OptimConfig(lr=1e-3, warmup_steps=0, scheduler="constant"))
    trainer = quiet_trainer(2, default_root_dir=str(tmp_path), callbacks=[FailAtFirstBatch()])
    try:
        trainer.fit(module, datamodule=data)
    except RuntimeError as err:
        assert "a failing step" in str(err)
    else:
        raise AssertionError("the fit should have failed")
    assert gc.get_freeze_count() == 0
