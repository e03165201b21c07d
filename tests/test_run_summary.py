"""``aa fit`` ends with a run summary naming the run's files and its final metrics (RunSummary callback)."""

from __future__ import annotations

import os
import re

import lightning.pytorch as pl
import pytest
import torch

from aa_lightning.callbacks import RunSummary
from aa_lightning.callbacks.summary import final_metrics
from aa_lightning.cli import build_cli


def fit(repo_path, root, *extra: str) -> None:
    args = ["fit", "--config", repo_path("configs", "tiny", "sft_t2t.yaml"), "--trainer.max_steps", "2"]
    args += ["--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"]
    args += ["--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *extra]
    build_cli(args)


def test_aa_fit_prints_where_everything_went(repo_path, tmp_path, capsys):
    fit(repo_path, tmp_path)
    out = capsys.readouterr().out
    summary = out[out.index("run summary:") :]
    assert re.match(r"run summary: 2 optimizer step\(s\) in \d+s \(global step 2, epoch \d+\)", summary)
    metrics = dict(re.findall(r"(\S+/\S+) (-?[\d.e+-]+)", summary.splitlines()[1]))
    assert {"train/loss", "val/loss"} <= set(metrics), summary
    ckpt = os.path.join(str(tmp_path), "checkpoints", "last.ckpt")
    export = os.path.join(str(tmp_path), "hf_model")
    assert f"checkpoint:    {ckpt}" in summary and os.path.isfile(ckpt)
    assert f"export:        {export}   (aa chat {export}" in summary and os.path.isdir(export)
    assert f"tensorboard --logdir {os.path.join(str(tmp_path), 'tensorboard')}" in summary


def test_summary_leaves_out_what_was_not_written_and_can_be_turned_off(repo_path, tmp_path, capsys):
    fit(repo_path, tmp_path, "--export.enabled", "false")
    summary = capsys.readouterr().out.split("run summary:")[1]
    assert "export:" not in summary and "checkpoint:" in summary
    args = ["--config", repo_path("configs", "tiny", "sft_t2t.yaml"), "--summary.enabled", "false"]
    trainer = build_cli([*args, "--trainer.default_root_dir", str(tmp_path)], run=False).trainer
    assert [c.enabled for c in trainer.callbacks if isinstance(c, RunSummary)] == [False]


def test_final_metrics_puts_losses_and_validation_first_and_skips_non_scalars():
    metrics = {
        "train/lr": torch.tensor(1e-4),
        "val/perplexity": torch.tensor(2.5),
        "train/loss": torch.tensor(0.5),
        "val/loss": torch.tensor(0.9),
        "rollout/hist": torch.zeros(3),
    }
    names = [n for n, _ in final_metrics(metrics)]
    assert names == ["val/loss", "train/loss", "val/perplexity", "train/lr"]
    assert final_metrics(metrics, limit=2) == [("val/loss", pytest.approx(0.9)), ("train/loss", 0.5)]


class StopAtFirstStep(pl.Callback):
    def on_train_batch_end(self, *args: object) -> None:
        raise RuntimeError("stopped by the test")


def test_a_failed_fit_prints_no_summary(repo_path, tmp_path, capsys):
    args = ["--config", repo_path("configs", "tiny", "sft_t2t.yaml"), "--trainer.max_steps", "2"]
    cli = build_cli([*args, "--trainer.default_root_dir", str(tmp_path)], run=False)
    cli.trainer.callbacks.append(StopAtFirstStep())
    with pytest.raises(RuntimeError, match="stopped by the test"):
        cli.trainer.fit(cli.model, cli.datamodule)
    assert any(isinstance(c, RunSummary) for c in cli.trainer.callbacks)
    assert "run summary" not in capsys.readouterr().out
