"""Under DeepSpeed with gradient accumulation every loss is divided by the accumulation steps once.

Lightning divides each micro-batch's loss by ``accumulate_grad_batches`` and DeepSpeed's engine would divide
it again, so gradients (and ``train/grad_norm``, and clipping) came out ``k`` times too small for every mean
loss (DPO here); ``CPUDeepSpeedStrategy`` keeps only Lightning's division. Batch 8 in one step and 4 x 2
accumulated give the same first gradient.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import synthetic_preferences

from aa_lightning.algorithms import DPOModule, OptimConfig
from aa_lightning.data import TextToTextDataModule


class FirstGradNorm(pl.Callback):
    def __init__(self) -> None:
        self.norm: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.norm is None and "train/grad_norm" in trainer.callback_metrics:
            self.norm = float(trainer.callback_metrics["train/grad_norm"])


def first_grad_norm(path: str, strategy: str, batch_size: int, accumulate: int, tmp_path: Any) -> float:
    recorder = FirstGradNorm()
    pl.seed_everything(0)
    dm = TextToTextDataModule(
        "tiny-qwen2",
        train={"path": path, "template": "HH-RLHF"},
        max_length=48,
        batch_size=batch_size,
        shuffle=False,
    )
    pl.Trainer(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    ).fit(DPOModule(optim=OptimConfig(lr=1e-3, warmup_steps=0, scheduler="constant")), datamodule=dm)
    assert recorder.norm is not None
    return recorder.norm


def test_dpo_gradient_is_the_same_with_deepspeed_accumulation(tmp_path: Any) -> None:
    import json

    rows = synthetic_preferences.hh_rows(
        synthetic_preferences.topics(seed=0)[:8], "{t} are lovely. Sure!", "{t} are awful.", "About {t}?"
    )
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    whole = first_grad_norm(str(path), "auto", 8, 1, tmp_path / "a")
    accumulated = first_grad_norm(str(path), "deepspeed_cpu_stage_2", 4, 2, tmp_path / "b")
    assert math.isclose(accumulated, whole, rel_tol=1e-4), (accumulated, whole)
