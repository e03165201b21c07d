"""RPO's NLL term, MPO-style weighted loss mixtures and WPO pair weights: by hand, then through DPOModule."""

from __future__ import annotations

import math

import pytest
import torch

from aa_lightning.algorithms import DPOModule
from aa_lightning.algorithms.losses.dpo_variants import combine_pair_losses, wpo_weights
from aa_lightning.batch import split_pairs
from tests.test_preference_modules import datamodule, hh_rows, topics, write


def test_combine_pair_losses_by_hand() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0])
    w, nll = torch.tensor([0.5, 0.25]), torch.tensor([2.0, 4.0])
    # pair 0: 0.5 * (0.8*1 + 0.2*0.5) + 0.1*2 = 0.5*0.9 + 0.2 = 0.65
    # pair 1: 0.25 * (0.8*2 + 0.2*0) + 0.1*4 = 0.4 + 0.4 = 0.8
    out = combine_pair_losses([a, b], [0.8, 0.2], w, nll, rpo_alpha=0.1)
    assert torch.allclose(out, torch.tensor([0.65, 0.8]))
    with pytest.raises(ValueError, match="loss_weights"):
        combine_pair_losses([a, b], [1.0])


def test_wpo_weights_by_hand() -> None:
    # exp(mean log p(y_w) + mean log p(y_l)): exp(-0.5 - 1.5) = e^-2, exp(-0.1 - 0.2) = e^-0.3
    w = wpo_weights(torch.tensor([-0.5, -0.1], requires_grad=True), torch.tensor([-1.5, -0.2]))
    assert torch.allclose(w, torch.tensor([math.exp(-2.0), math.exp(-0.3)]))
    assert not w.requires_grad


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A DPO module whose reference differs from the policy (tiny-llama), and one batch."""
    path = write(tmp_path_factory.mktemp("pairs") / "train.jsonl", hh_rows(topics()[:8]))
    module = DPOModule(ref_model_name_or_path="tiny-llama")
    module.configure_model()
    dm = datamodule(path, kind="preference")
    dm.setup("fit")
    return module, next(iter(dm.train_dataloader()))


def loss_with(module: DPOModule, batch, **options) -> float:
    saved = {
        k: getattr(module, k)
        for k in ("loss_type", "loss_types", "loss_weights", "rpo_alpha", "use_weighting")
    }
    names = options.pop("loss_type", ["sigmoid"])
    module.loss_type, module.loss_types = names[0], names
    for k, v in options.items():
        setattr(module, k, v)
    with torch.no_grad():
        loss, _ = module.compute_loss(batch, "train")
    for k, v in saved.items():
        setattr(module, k, v)
    return float(loss)


def test_module_options_combine_the_parts(scored) -> None:
    module, batch = scored
    sigmoid, ipo = loss_with(module, batch), loss_with(module, batch, loss_type=["ipo"])
    mixed = loss_with(module, batch, loss_type=["sigmoid", "ipo"], loss_weights=[0.7, 0.3])
    assert math.isclose(mixed, 0.7 * sigmoid + 0.3 * ipo, rel_tol=1e-5)
    with torch.no_grad():
        chosen_mean, rejected_mean = split_pairs(module.policy_log_probs(batch).mean)
    rpo = loss_with(module, batch, rpo_alpha=0.5)
    assert math.isclose(rpo, sigmoid + 0.5 * float(-chosen_mean.mean()), rel_tol=1e-5)
    assert rpo > sigmoid + 0.1  # the NLL term is not zero on a random model
    with torch.no_grad():
        module.use_weighting = False
        _, stats = module.compute_loss(batch, "train")
    weights = torch.exp(chosen_mean + rejected_mean)
    wpo = loss_with(module, batch, use_weighting=True)
    assert math.isclose(wpo, float((weights * stats["loss"]).mean()), rel_tol=1e-5)


def test_module_rejects_bad_mixtures() -> None:
    with pytest.raises(ValueError, match="loss_weights"):
        DPOModule(loss_type=["sigmoid", "bco_pair"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="loss_type"):
        DPOModule(loss_type=["sigmoid", "nope"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="rpo_alpha"):
        DPOModule(rpo_alpha=-1.0)
