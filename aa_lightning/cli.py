"""The ``aa`` command: a LightningCLI over every algorithm module and every datamodule.

aa fit --config configs/sft_t2t.yaml
aa fit --config configs/tiny/sft_t2t.yaml --trainer.max_steps 20 --model.init_args.optim.lr 1e-4
aa fit --config configs/tiny/sft_t2t.yaml --model.init_args.optim.warmup_steps null
aa fit --config configs/tiny/sft_t2t.yaml --ckpt_path last      # resume exactly
aa fit --config configs/tiny/sft_t2t.yaml --print_config
aa chat runs/sft                                                  # talk to a trained model (aa_lightning.chat)
aa list                                                           # algorithms, datamodules, templates ...
aa eval --config configs/eval/tiny_suite.yaml --model runs/sft    # score a model on tasks (aa_lightning.evaluation)
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

import aa_lightning.algorithms  # noqa: F401  (imported, so `--model SFTModule` / `--model.help SFTModule` resolve)
import aa_lightning.data  # noqa: F401  (the same for `--data TextToTextDataModule`)
import aa_lightning.strategies  # noqa: F401  (registers the CPU-capable DeepSpeed strategies)
from aa_lightning.callbacks import HFExportCallback, JsonlPredictionWriter, RolloutMediaLogger, RunSummary
from aa_lightning.callbacks.progress import default_progress_bar
from aa_lightning.checkpoint_io import remove_stale_partial_saves
from aa_lightning.listing import help_parser_kwargs

DEFAULT_LOG_DIR = "runs"
log = logging.getLogger(__name__)

# Lightning's DeepSpeed names -> the same strategy with atomic checkpoint directories (identical on GPUs)
ATOMIC_DEEPSPEED = {
    "deepspeed": "deepspeed_cpu",
    "deepspeed_stage_1": "deepspeed_cpu_stage_1",
    "deepspeed_stage_2": "deepspeed_cpu_stage_2",
    "deepspeed_stage_2_offload": "deepspeed_cpu_stage_2_offload",
    "deepspeed_stage_3": "deepspeed_cpu_stage_3",
    "deepspeed_stage_3_offload": "deepspeed_cpu_stage_3_offload",
}


class CLIError(Exception):
    """A mistake in the command itself: ``aa`` prints it as one line (no traceback) and exits with status 2."""


def keep_nested_null_overrides() -> None:
    """Make ``--model.init_args.optim.warmup_steps null`` set None (jsonargparse 4.x refuses it).

    Why: an override two levels below a class (``model`` -> ``optim`` -> ``warmup_steps``) reaches jsonargparse's
    ``adapt_class_type`` as ``NestedArg(key="optim.warmup_steps", val=None)``, the value already parsed from
    YAML, and is parsed again from the text ``f"--{key}={val}"``, i.e. ``--optim.warmup_steps=None``; the
    string "None" is not YAML's null, so ``int | None`` rejects it (and a ``str | None`` field would get the
    string "None"). Parsed values are written back as JSON (``null``, ``true``, ``[0.9, 0.99]``), which YAML
    reads back unchanged. Strings are passed through as they are, so nothing else changes.
    """
    import json

    from jsonargparse import Namespace
    from jsonargparse import _typehints as typehints

    original = getattr(typehints, "adapt_class_type", None)
    nested_arg = getattr(typehints, "NestedArg", None)
    if original is not None and getattr(original, "_keeps_nested_null", False):
        return
    if original is None or nested_arg is None:  # jsonargparse moved its internals: say so, once, at import
        import warnings

        warnings.warn(
            "aa_lightning.cli: this jsonargparse version has no _typehints.adapt_class_type/NestedArg; "
            "`null` for nested fields on the command line (e.g. optim.warmup_steps) may be refused",
            stacklevel=2,
        )
        return

    def adapt_class_type(value: Any, *args: Any, **kwargs: Any) -> Any:
        init_args = value.get("init_args") if isinstance(value, Namespace) else None
        if isinstance(init_args, nested_arg) and not isinstance(init_args.val, str):
            try:
                text = json.dumps(init_args.val)
            except (TypeError, ValueError):
                text = None
            if text is not None:
                value = value.clone()
                value["init_args"] = nested_arg(key=init_args.key, val=text)
        return original(value, *args, **kwargs)

    adapt_class_type._keeps_nested_null = True  # type: ignore[attr-defined]
    typehints.adapt_class_type = adapt_class_type


keep_nested_null_overrides()


class AACLI(LightningCLI):
    """LightningCLI with the model path shared by model and data, checkpoints kept in one place."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.model_name_or_path")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        parser.add_lightning_class_args(HFExportCallback, "export")
        parser.add_lightning_class_args(RolloutMediaLogger, "rollout_media")
        parser.add_lightning_class_args(JsonlPredictionWriter, "predictions")
        parser.add_lightning_class_args(RunSummary, "summary")  # --summary.enabled false: none

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
        strategy = config.trainer.get("strategy")
        if isinstance(strategy, str) and strategy in ATOMIC_DEEPSPEED:
            config.trainer.strategy = ATOMIC_DEEPSPEED[strategy]

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> pl.Trainer:
        """Add a terminal-aware progress bar (:mod:`aa_lightning.callbacks.progress`) unless one is configured."""
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in [*configured, *callbacks]
        ):
            callbacks = [*callbacks, default_progress_bar()]
        return super()._instantiate_trainer(config, callbacks)

    # -- `--ckpt_path last` ------------------------------------------------------------------------------
    def before_fit(self) -> None:
        self.resolve_last_checkpoint(start_fresh_without_one=True)

    def before_validate(self) -> None:
        self.resolve_last_checkpoint()

    def before_test(self) -> None:
        self.resolve_last_checkpoint()

    def before_predict(self) -> None:
        self.resolve_last_checkpoint()

    def checkpoint_dirs(self) -> list[str]:
        return [
            os.fspath(cb.dirpath)
            for cb in self.trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None
        ]

    def resolve_last_checkpoint(self, start_fresh_without_one: bool = False) -> None:
        """Turn ``ckpt_path: last`` into the newest ``last*.ckpt``, clearing partial saves first.

        Without one, ``fit`` starts a new run (so the same command can launch and resume a job) and says so in
        one line; ``validate``/``test``/``predict`` stop with one line rather than evaluate untrained weights.
        """
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        dirs = self.checkpoint_dirs()
        if rank_zero_only.rank == 0:
            for directory in dirs:
                remove_stale_partial_saves(directory)
        found: set[str] = set()
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                found |= callback._find_last_checkpoints(self.trainer)
        existing = [path for path in found if os.path.exists(path)]
        if existing:
            config.ckpt_path = max(existing, key=os.path.getmtime)
            return
        where = " or ".join(dirs) if dirs else "the run (no `checkpoint` callback is configured)"
        if start_fresh_without_one:
            config.ckpt_path = None
            if rank_zero_only.rank == 0:
                log.warning("--ckpt_path last: no checkpoint in %s yet; starting a new run", where)
            return
        raise CLIError(
            f"--ckpt_path last: no checkpoint in {where} to {self.subcommand} from; run `aa fit` with the same "
            "--trainer.default_root_dir first, or pass --ckpt_path PATH"
        )


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
        parser_kwargs=help_parser_kwargs(),
    )


# subcommands that are not LightningCLI's: name -> "module:function" taking the remaining arguments
TOOLS = {
    "chat": "aa_lightning.chat:main",
    "eval": "aa_lightning.evaluation:main",
    "list": "aa_lightning.listing:main",
}


def main() -> None:
    """Entry point of the ``aa`` console script."""
    if len(sys.argv) > 1 and sys.argv[1] in TOOLS:
        import importlib

        module, function = TOOLS[sys.argv[1]].split(":")
        getattr(importlib.import_module(module), function)(sys.argv[2:])
        return
    try:
        build_cli()
    except CLIError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
