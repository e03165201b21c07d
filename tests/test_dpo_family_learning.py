"""The new DPO-family options learn on the tiny text model: held-out chosen-over-rejected log-ratio rises."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from aa_lightning.algorithms import CPOModule, DPOModule, OptimConfig
from aa_lightning.models import load_pretrained_models
from tests.test_preference_modules import datamodule, held_out_log_ratio, pair_files, trainer  # noqa: F401


def optim() -> OptimConfig:
    return OptimConfig(lr=2e-3, warmup_steps=0, scheduler="constant")


OPTIONS = {
    name: {"loss_type": name}
    for name in (
        "robust",
        "exo_pair",
        "nca_pair",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
    )
    + ("sigmoid_norm",)
}
OPTIONS["robust"]["label_smoothing"] = 0.1
OPTIONS["mpo_rpo"] = {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [0.8, 0.2], "rpo_alpha": 0.5}
OPTIONS["wpo"] = {"use_weighting": True}


@pytest.mark.parametrize("option", [*OPTIONS, "cpo"])
def test_option_learns_held_out_preference(option, pair_files, tmp_path):  # noqa: F811
    pl.seed_everything(0)
    if option == "cpo":
        module = CPOModule(beta=0.1, optim=optim())
    else:
        module = DPOModule(beta=0.1, optim=optim(), **OPTIONS[option])
    initial, _, _ = load_pretrained_models("tiny-qwen2")
    before = held_out_log_ratio(initial, pair_files["val"])
    trainer(tmp_path, 30).fit(module, datamodule(pair_files["train"]))
    gain = held_out_log_ratio(module.model, pair_files["val"]) - before
    assert gain.mean() > 5.0, f"{option}: held-out log-ratio gain only {gain.mean():.2f} nats"
    assert (gain > 0).float().mean() >= 0.9, f"{option}: gain positive on {(gain > 0).float().mean():.0%}"
    assert torch.isfinite(gain).all()


def test_discopop_descends_its_own_loss(pair_files, tmp_path):  # noqa: F811
    """DiscoPOP's loss rises just above rho = 0 (its blend jumps from logistic to exponential, Lu et al. 2024
    fig. 3), so from policy == reference it first falls into the local minimum at small negative rho: the
    held-out margin does not rise in 30 steps. What must hold: training lowers the loss from its rho = 0
    value ``(1/2) log 2 + (1/2) e^0``."""
    pl.seed_everything(0)
    module = DPOModule(beta=0.1, optim=optim(), loss_type="discopop")
    t = trainer(tmp_path, 30, val_check_interval=30, check_val_every_n_epoch=None)
    t.fit(module, datamodule(pair_files["train"], pair_files["val"]))
    start = 0.5 * math.log(2) + 0.5
    assert float(t.callback_metrics["val/loss"]) < start - 0.02
