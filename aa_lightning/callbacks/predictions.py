"""Write ``aa predict`` outputs to a JSON-lines file (one generation per line)."""

from __future__ import annotations

import json
import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter


class JsonlPredictionWriter(BasePredictionWriter):
    """Appends ``{prompt, response, meta}`` rows to ``<dirpath or default_root_dir>/predictions[_rankN].jsonl``."""

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.dirpath = dirpath

    def path(self, trainer: pl.Trainer) -> str:
        directory = self.dirpath or trainer.default_root_dir
        os.makedirs(directory, exist_ok=True)
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        return os.path.join(directory, f"predictions{suffix}.jsonl")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        open(self.path(trainer), "w").close()

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        with open(self.path(trainer), "a") as f:
            for row in prediction:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
