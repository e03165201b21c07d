"""The aa-lightning side of each workload: the real modules and datamodule, driven by a Lightning Trainer.

Settings mirror :func:`benchmarks.trl_side.common_args`: AdamW (betas 0.9/0.999, eps 1e-8, no weight decay),
constant learning rate without warm-up, gradient clipping at the same norm, in-order batches, no checkpoints,
no validation, metrics logged every ``log_every`` steps.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.common import BenchConfig, CountingCollator, StepTimer, make_result


def optim_config(config: BenchConfig) -> Any:
    from aa_lightning.algorithms.config import OptimConfig

    return OptimConfig(
        lr=config.lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, warmup_steps=0, scheduler="constant"
    )


def datamodule(config: BenchConfig, **kwargs: Any) -> Any:
    """The text datamodule on the prepared rows, counting the non-pad tokens of every batch it collates."""
    from aa_lightning.data import TextToTextDataModule

    class CountingDataModule(TextToTextDataModule):
        counter: CountingCollator | None = None

        def build_collator(self, kind: str) -> Any:
            # the training loader is the last one built (a reference pre-pass may build one before it)
            self.counter = CountingCollator(super().build_collator(kind))
            return self.counter

    options = dict(
        model_name_or_path=config.model_path,
        train={"path": config.data_file, "template": config.extra["template"]},
        max_length=config.max_length,
        batch_size=config.batch_size,
        num_workers=0,
        shuffle=False,
        seed=config.seed,
    )
    options.update(kwargs)
    return CountingDataModule(**options)


def trainer(config: BenchConfig, timer: StepTimer) -> Any:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    class _Timer(pl.Callback):
        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            timer.step_end()

    return pl.Trainer(
        accelerator="gpu" if config.device.startswith("cuda") else "cpu",
        devices=1,
        max_steps=config.steps,
        precision="bf16-mixed" if config.bf16 else "32-true",
        gradient_clip_val=config.max_grad_norm,
        logger=CSVLogger(os.path.join(config.work_dir, "aa_logs")),
        log_every_n_steps=config.log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=config.work_dir,
        callbacks=[_Timer()],
        deterministic=False,
    )


def fit(module: Any, data: Any, config: BenchConfig, unit: str, per_step: float, **extra: Any) -> dict[str, Any]:
    import lightning.pytorch as pl

    pl.seed_everything(config.seed, verbose=False)
    timer = StepTimer(config.device)
    trainer(config, timer).fit(module, datamodule=data)
    counts = data.counter.counts if data.counter is not None else None
    return make_result(config, timer, unit, per_step, counts, **extra)


def run_sft(config: BenchConfig) -> dict[str, Any]:
    from aa_lightning.algorithms import SFTModule

    module = SFTModule(model_name_or_path=config.model_path, dtype="float32", optim=optim_config(config))
    return fit(module, datamodule(config, train_on="last_assistant"), config, "samples", config.batch_size)


def run_dpo(config: BenchConfig, precompute: bool = False) -> dict[str, Any]:
    from aa_lightning.algorithms.preference import DPOModule

    module = DPOModule(
        model_name_or_path=config.model_path,
        dtype="float32",
        optim=optim_config(config),
        beta=config.beta,
        loss_type="sigmoid",
        precompute_ref_log_probs=precompute,
        ref_cache_dir=os.path.join(config.work_dir, "ref_logps") if precompute else None,
    )
    data = datamodule(config, train_on="last_assistant")
    return fit(module, data, config, "samples", config.batch_size)


def run_dpo_precomputed(config: BenchConfig) -> dict[str, Any]:
    return run_dpo(config, precompute=True)


def run_rm(config: BenchConfig) -> dict[str, Any]:
    from aa_lightning.algorithms.reward import RewardModule

    module = RewardModule(model_name_or_path=config.model_path, dtype="float32", optim=optim_config(config))
    return fit(module, datamodule(config, train_on="last_assistant"), config, "samples", config.batch_size)


RUNNERS = {"sft": run_sft, "dpo": run_dpo, "dpo_precomputed": run_dpo_precomputed, "rm": run_rm}
