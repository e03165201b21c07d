"""The ``aa`` command: a LightningCLI over every algorithm module and every datamodule.

aa fit --config configs/sft_t2t.yaml
aa fit --config configs/tiny/sft_t2t.yaml --trainer.max_steps 20 --model.init_args.optim.lr 1e-4
aa fit --config configs/tiny/sft_t2t.yaml --ckpt_path last      # resume exactly
aa fit --config configs/tiny/sft_t2t.yaml --print_config
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

import aa_lightning.strategies  # noqa: F401  (registers the CPU-capable DeepSpeed strategies)
from aa_lightning.callbacks import HFExportCallback, JsonlPredictionWriter

DEFAULT_LOG_DIR = "runs"


class AACLI(LightningCLI):
    """LightningCLI with the model path shared by model and data, checkpoints kept in one place."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.model_name_or_path")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        parser.add_lightning_class_args(HFExportCallback, "export")
        parser.add_lightning_class_args(JsonlPredictionWriter, "predictions")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None:
            return
        root = config.trainer.default_root_dir or os.path.join("runs", "default")
        config.trainer.default_root_dir = root
        logger = config.trainer.get("logger")
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        if init_args is not None and "TensorBoardLogger" in str(logger.get("class_path")):
            if init_args.get("save_dir") == DEFAULT_LOG_DIR:  # the default: keep the run's files together
                init_args.save_dir = root
                init_args.name = "tensorboard"
        if config.get("checkpoint") is not None and not config.checkpoint.get("dirpath"):
            # fixed (not per-version) so that `--ckpt_path last` finds the last checkpoint of the run
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")


def build_cli(args: list[str] | None = None, run: bool = True) -> AACLI:
    """Parse ``args`` (default: the command line) and run the subcommand; returns the CLI object."""
    return AACLI(
        model_class=pl.LightningModule,
        datamodule_class=pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": DEFAULT_LOG_DIR},
            },
            "plugins": [{"class_path": "aa_lightning.checkpoint_io.AtomicCheckpointIO"}],
        },
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main() -> None:
    """Entry point of the ``aa`` console script."""
    build_cli()


if __name__ == "__main__":
    main()
