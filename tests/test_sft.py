"""SFT end to end: learning, validation perplexity, HF export, exact resume, TensorBoard, ZeRO-2/3."""

from __future__ import annotations

import glob
import json
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import AutoModelForCausalLM

from aa_lightning.algorithms import OptimConfig, SFTModule
from aa_lightning.callbacks import HFExportCallback
from aa_lightning.checkpoint_io import AtomicCheckpointIO
from aa_lightning.data import DataSpec, TextToTextDataModule


def alpaca(repo_path, size=8, **kwargs):
    spec = DataSpec(repo_path("configs", "data", "alpaca_200.json"), "Alpaca", size=size)
    return TextToTextDataModule(
        "tiny-qwen2", train=spec, val=spec, max_length=96, batch_size=kwargs.pop("batch_size", 4), **kwargs
    )


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def trainer(tmp_path, max_steps, callbacks=(), **kwargs):
    return pl.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=kwargs.pop("logger", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **kwargs,
    )


def test_sft_overfits_eight_examples_and_logs_val_perplexity(tmp_path, repo_path):
    pl.seed_everything(0)
    module = SFTModule("tiny-qwen2", optim=OptimConfig(lr=2e-2, warmup_steps=0, scheduler="constant"))
    recorder = LossRecorder()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    t = trainer(
        tmp_path,
        80,
        [recorder],
        logger=logger,
        val_check_interval=40,
        log_every_n_steps=5,
        check_val_every_n_epoch=None,
    )
    t.fit(module, alpaca(repo_path, batch_size=8))
    first, last = recorder.losses[1], recorder.losses[80]
    assert first > 6.0  # a random 2048-token model starts near log(2048) = 7.6
    assert last < 2.0, f"SFT did not overfit: loss {first:.2f} -> {last:.2f}"
    assert "val/perplexity" in t.callback_metrics
    assert torch.isclose(t.callback_metrics["val/perplexity"], t.callback_metrics["val/loss"].exp())
    # TensorBoard event files hold train/loss
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = glob.glob(os.path.join(str(tmp_path), "tb", "**", "events.out.tfevents.*"), recursive=True)
    assert events
    accumulator = EventAccumulator(os.path.dirname(events[0]))
    accumulator.Reload()
    assert {"train/loss", "train/lr", "val/perplexity", "train/tokens_per_s"} <= set(
        accumulator.Tags()["scalars"]
    )


def test_export_then_from_pretrained_gives_identical_logits(tmp_path, repo_path):
    pl.seed_everything(0)
    module = SFTModule("tiny-llama", optim=OptimConfig(lr=1e-3))
    export_dir = tmp_path / "hf"
    t = trainer(tmp_path, 3, [HFExportCallback(str(export_dir))])
    dm = alpaca(repo_path)
    dm.hparams.model_name_or_path = "tiny-llama"
    t.fit(module, dm)
    reloaded = AutoModelForCausalLM.from_pretrained(str(export_dir)).eval()
    assert os.path.exists(export_dir / "tokenizer.json")
    ids = torch.tensor([[3, 50, 60, 70, 80]])
    module.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, module.model(ids).logits)


class StopAt(pl.Callback):
    """Simulates an interruption: the run ends after ``step`` (its schedule still plans for max_steps)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_resume_mid_epoch_gives_the_same_losses(tmp_path, repo_path):
    """8 rows, batch 2: a checkpoint at step 6 is mid-epoch (epoch 1, batch 2)."""

    def run(stop_at=None, ckpt_path=None, root="a"):
        pl.seed_everything(0)
        module = SFTModule("tiny-qwen2", optim=OptimConfig(lr=5e-3, warmup_steps=2))
        recorder = LossRecorder()
        checkpoint = ModelCheckpoint(
            dirpath=str(tmp_path / root / "ckpt"), save_last=True, save_top_k=0, every_n_train_steps=6
        )
        callbacks = [recorder, checkpoint] + ([StopAt(stop_at)] if stop_at else [])
        t = trainer(tmp_path / root, 12, callbacks, plugins=[AtomicCheckpointIO()])
        t.fit(module, alpaca(repo_path, batch_size=2), ckpt_path=ckpt_path)
        return recorder.losses

    straight = run(root="straight")
    interrupted = run(stop_at=6, root="interrupted")
    assert interrupted == {k: v for k, v in straight.items() if k <= 6}
    resumed = run(ckpt_path=str(tmp_path / "interrupted" / "ckpt" / "last.ckpt"), root="resumed")
    assert sorted(resumed) == list(range(7, 13))
    for step in range(7, 13):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-6), step


@pytest.mark.parametrize("strategy", ["deepspeed_cpu_stage_2", "deepspeed_cpu_stage_3"])
def test_tiny_sft_config_runs_under_zero(tmp_path, repo_path, strategy):
    from aa_lightning.cli import build_cli

    root = str(tmp_path / "run")
    build_cli(
        [
            "fit",
            "--config",
            repo_path("configs", "tiny", "sft_t2t.yaml"),
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "2",
            "--trainer.strategy",
            strategy,
            "--trainer.default_root_dir",
            root,
            "--trainer.logger.init_args.save_dir",
            root,
        ]
    )
    export = os.path.join(root, "hf_model")
    model = AutoModelForCausalLM.from_pretrained(export)
    assert sum(p.numel() for p in model.parameters()) > 100_000  # gathered, not ZeRO-3 shards
    with open(os.path.join(export, "config.json")) as f:
        assert json.load(f)["model_type"] == "qwen2"
    assert glob.glob(os.path.join(root, "**", "events.out.tfevents.*"), recursive=True)


def test_lora_trains_adapters_only_and_exports_merged_weights(tmp_path, repo_path):
    from aa_lightning.algorithms import LoraConfig

    pl.seed_everything(0)
    module = SFTModule(
        "tiny-qwen2",
        optim=OptimConfig(lr=5e-2, warmup_steps=0),
        gradient_checkpointing=True,
        lora=LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear"),
    )
    recorder = LossRecorder()
    export_dir = tmp_path / "hf"
    t = trainer(tmp_path, 12, [recorder, HFExportCallback(str(export_dir))])
    t.fit(module, alpaca(repo_path, batch_size=8))
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert recorder.losses[12] < recorder.losses[1] - 0.05  # frozen random base: adapters learn slowly
    reloaded = AutoModelForCausalLM.from_pretrained(str(export_dir)).eval()
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    ids = torch.tensor([[3, 50, 60, 70, 80]])
    module.model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, module.model(ids).logits, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "trained", "frozen"),
    [("tiny-emu3", ".text_model.", (".vqmodel.",)), ("tiny-sd", ".unet.", (".text_encoder.", ".vae."))],
)
def test_lora_all_linear_puts_no_adapter_in_a_frozen_part(name: str, trained: str, frozen: tuple) -> None:
    """Emu3's VQ-VAE and a diffusion model's VAE and text encoder never train: adapters there would be
    parameters without gradients (DDP stops on them: "parameters that were not used in producing the loss")."""
    from aa_lightning.algorithms import LoraConfig

    module = SFTModule(name, lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    module.configure_model()
    adapters = [n for n, p in module.model.named_parameters() if "lora_" in n and p.requires_grad]
    assert adapters and all(trained in n for n in adapters), adapters[:4]
    assert not [n for n in adapters if any(part in n for part in frozen)]
