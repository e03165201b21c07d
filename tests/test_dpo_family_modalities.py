"""One new pair loss on an image-input and an audio-input model, through the CLI and the real processors.

``nca_pair`` with policy == reference (step 0) is ``-log s(0) - 1/2 log s(0) - 1/2 log s(0) = 2 log 2``, not
DPO's ``log 2``: the value shows the new loss, not the default one, ran on the multimodal batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from aa_lightning.cli import build_cli


@pytest.mark.parametrize("config", ["dpo_ti2t", "dpo_ta2t"])
def test_nca_pair_runs_on_image_and_audio_models(config, repo_path, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_path())
    args = ["--config", repo_path("configs", "tiny", f"{config}.yaml")]
    args += ["--model.init_args.loss_type", "nca_pair", "--trainer.default_root_dir", str(tmp_path)]
    args += [
        "--trainer.max_steps",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.kind",
        "preference",
    ]
    cli = build_cli(args, run=False)
    module, dm = cli.model, cli.datamodule
    assert module.loss_type == "nca_pair"
    module.configure_model()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        loss, _ = module.compute_loss(batch, "train")
    assert math.isclose(float(loss), 2 * math.log(2), abs_tol=1e-4)
    cli.trainer.fit(module, dm)
    assert cli.trainer.global_step == 2
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
