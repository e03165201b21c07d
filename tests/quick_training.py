"""The short, quiet CPU Trainer and the fixed-noise batch the output-family tests train and measure with."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def quiet_trainer(max_steps: int, **kwargs: Any) -> pl.Trainer:
    """A one-device CPU Trainer with no logger, checkpoints, progress bar, sanity or validation runs."""
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kwargs,
    )


def fixed_batch(dm: pl.LightningDataModule, seed: int = 1234) -> dict[str, Any]:
    """The first training batch with its noise seeds fixed by ``seed`` (before and after see the same noise)."""
    dm.setup("fit")
    pl.seed_everything(seed)
    return next(iter(dm.train_dataloader()))
