"""Write the trained model in Hugging Face format at the end of fit (``from_pretrained`` loads it)."""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info


class HFExportCallback(pl.Callback):
    """Calls the module's ``export_pretrained`` at the end of fit.

    Args:
        dirpath: target folder; default ``<trainer.default_root_dir>/hf_model``.
        enabled: set False to skip the export.
    """

    def __init__(self, dirpath: str | None = None, enabled: bool = True) -> None:
        self.dirpath = dirpath
        self.enabled = enabled

    def target(self, trainer: pl.Trainer) -> str:
        return self.dirpath or os.path.join(trainer.default_root_dir, "hf_model")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        export = getattr(pl_module, "export_pretrained", None)
        if not self.enabled or export is None:
            return
        path = self.target(trainer)
        export(path)
        trainer.strategy.barrier("hf_export")
        rank_zero_info(f"Exported the trained model in Hugging Face format to {path}")
