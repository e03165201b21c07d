"""A NaN/inf loss or gradient norm stops the run at once, naming the step and the quantity; nothing is exported.

The NaNs are produced on the real code path: a poisoned weight (NaN loss at step 1) or a gradient hook that
turns one parameter's gradient into NaN (finite loss, non-finite gradient norm).
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from aa_lightning.algorithms import GenerationConfig, GRPOModule, OptimConfig, SFTModule
from aa_lightning.algorithms.nonfinite import NonFiniteError
from aa_lightning.callbacks import HFExportCallback
from aa_lightning.cli import build_cli
from aa_lightning.data import TextToTextDataModule
from aa_lightning.rewards import RewardSpec


def datamodule(repo_path: Any, size: int = 16) -> TextToTextDataModule:
    return TextToTextDataModule(
        "tiny-qwen2",
        train={"path": repo_path("configs/data/alpaca_200.json"), "template": "Alpaca", "size": size},
        max_length=48,
        batch_size=4,
    )


class PoisonWeight(pl.Callback):
    """Set one LM-head weight to NaN before the first step: every logit row, hence the loss, becomes NaN."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            pl_module.model.get_output_embeddings().weight[0, 0] = float("nan")


class PoisonGradient(pl.Callback):
    """Make one parameter's gradient NaN in the first ``times`` backward passes (the loss stays finite)."""

    def __init__(self, times: int = 10**9) -> None:
        self.times = times

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        param = next(p for p in pl_module.model.parameters() if p.requires_grad)
        state = {"left": self.times}

        def hook(grad: torch.Tensor) -> torch.Tensor:
            if state["left"] <= 0:
                return grad
            state["left"] -= 1
            return grad * float("nan")

        param.register_hook(hook)


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def trainer(tmp_path: Any, callbacks: list, steps: int = 3, strategy: str = "auto") -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, HFExportCallback(dirpath=str(tmp_path / "hf"))],
    )


def test_nan_loss_stops_at_step_one_and_exports_nothing(repo_path: Any, tmp_path: Any) -> None:
    with pytest.raises(NonFiniteError, match=r"optimizer step 1: the loss is nan"):
        trainer(tmp_path, [PoisonWeight()]).fit(SFTModule(), datamodule(repo_path))
    assert not os.path.exists(tmp_path / "hf")


@pytest.mark.parametrize("strategy", ["auto", "deepspeed_cpu_stage_2"])
def test_nan_gradient_norm_stops_the_run(strategy: str, repo_path: Any, tmp_path: Any) -> None:
    with pytest.raises(NonFiniteError, match=r"optimizer step 1: the gradient norm is (nan|inf)"):
        trainer(tmp_path, [PoisonGradient()], strategy=strategy).fit(SFTModule(), datamodule(repo_path))
    assert not os.path.exists(tmp_path / "hf")


def test_skip_drops_the_bad_step_and_trains_on(repo_path: Any, tmp_path: Any) -> None:
    module = SFTModule(on_nonfinite="skip", optim=OptimConfig(lr=1e-2, warmup_steps=0, scheduler="constant"))
    start: dict[str, torch.Tensor] = {}
    after_first: dict[str, torch.Tensor] = {}

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            start.update({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if not after_first:
                after_first.update({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})

    losses = Losses()
    trainer(tmp_path, [PoisonGradient(times=1), Snapshot(), losses]).fit(module, datamodule(repo_path))
    for name, value in start.items():
        assert torch.equal(after_first[name], value), f"{name} changed in the skipped step"
    assert losses.metrics[0]["train/skipped_steps"] == 1.0
    assert losses.metrics[-1]["train/skipped_steps"] == 1.0  # later steps were applied
    assert module.skipped_steps == 1
    exported = torch.nn.utils.parameters_to_vector(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).parameters()
    )
    assert torch.isfinite(exported).all()
    assert not torch.equal(exported, torch.nn.utils.parameters_to_vector(start.values()))


def test_skip_under_deepspeed_is_refused_at_start(repo_path: Any, tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="on_nonfinite: skip is not supported under DeepSpeed"):
        trainer(tmp_path, [], strategy="deepspeed_cpu_stage_2").fit(
            SFTModule(on_nonfinite="skip"), datamodule(repo_path)
        )


def test_rl_nan_gradient_norm_stops_the_run(repo_path: Any, tmp_path: Any) -> None:
    module = GRPOModule(
        reward_functions=[RewardSpec("response_length")],
        num_generations=2,
        generation=GenerationConfig(max_new_tokens=4),
    )
    with pytest.raises(NonFiniteError, match=r"optimizer step 1: the gradient norm is (nan|inf)"):
        trainer(tmp_path, [PoisonGradient()]).fit(module, datamodule(repo_path, size=4))
    assert not os.path.exists(tmp_path / "hf")


def test_export_refuses_non_finite_weights(tmp_path: Any) -> None:
    module = SFTModule()
    module.configure_model()
    with torch.no_grad():
        next(module.model.parameters())[0] = float("inf")
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        module.export_pretrained(str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf" / "config.json")


def test_cli_run_with_nan_loss_fails_loudly(repo_path: Any, tmp_path: Any, monkeypatch: Any) -> None:
    """The command-line path: an absurd learning rate blows the weights up in step 1, so step 2 is non-finite;
    `aa fit` raises instead of exporting."""
    monkeypatch.chdir(repo_path())
    root = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="optimizer step 2: the (loss|gradient norm) is"):
        build_cli(
            [
                "fit",
                "--config",
                repo_path("configs", "tiny", "sft_t2t.yaml"),
                "--trainer.max_steps",
                "3",
                "--trainer.default_root_dir",
                str(root),
                "--trainer.enable_progress_bar",
                "false",
                "--model.init_args.optim.lr",
                "1e30",
                "--model.init_args.optim.warmup_steps",
                "0",
            ]
        )
    assert not os.path.exists(root / "hf_model")


def test_rl_skip_drops_the_bad_update_and_trains_on(repo_path: Any, tmp_path: Any) -> None:
    module = GRPOModule(
        reward_functions=[RewardSpec("response_length")],
        num_generations=2,
        generation=GenerationConfig(max_new_tokens=4),
        on_nonfinite="skip",
    )
    losses = Losses()
    trainer(tmp_path, [PoisonGradient(times=1), losses], steps=2).fit(module, datamodule(repo_path, size=8))
    assert module.skipped_steps == 1
    assert losses.metrics[-1]["train/skipped_steps"] == 1.0
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    assert os.path.exists(tmp_path / "hf" / "config.json")
