"""CPO's loss by hand (arXiv:2401.08417, eq. 5) and its module on the tiny text model."""

from __future__ import annotations

import math

import torch

from aa_lightning.algorithms import CPOModule
from aa_lightning.algorithms.losses.dpo_variants import cpo_loss
from tests.test_preference_modules import pair_files  # noqa: F401


def test_cpo_loss_by_hand() -> None:
    pw, pl, nll = torch.tensor([-4.0, -6.0]), torch.tensor([-5.0, -5.0]), torch.tensor(1.5)
    # beta (pw - pl) = 0.5 * [1, -1]: -log s(0.5) = 0.474077, -log s(-0.5) = 0.974077; mean 0.724077
    loss, losses = cpo_loss(pw, pl, nll, beta=0.5)
    assert math.isclose(losses[0].item(), math.log1p(math.exp(-0.5)), rel_tol=1e-6)
    assert math.isclose(
        loss.item(), (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.5))) / 2 + 1.5, rel_tol=1e-6
    )
    e = 0.1
    loss, _ = cpo_loss(pw[:1], pl[:1], torch.tensor(0.0), beta=0.5, label_smoothing=e)
    want = (1 - e) * math.log1p(math.exp(-0.5)) + e * math.log1p(math.exp(0.5))
    assert math.isclose(loss.item(), want, rel_tol=1e-6)


def test_cpo_module_adds_the_chosen_token_nll(pair_files) -> None:  # noqa: F811
    from tests.test_preference_modules import datamodule

    module = CPOModule(beta=0.1)
    module.configure_model()
    dm = datamodule(pair_files["train"], kind="preference")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        loss, stats = module.compute_loss(batch, "train")
        policy = module.policy_log_probs(batch)
    half = policy.sum.shape[0] // 2
    nll = -policy.sum[:half].sum() / policy.token_count[:half].sum()
    pref = torch.nn.functional.softplus(-0.1 * (policy.sum[:half] - policy.sum[half:])).mean()
    assert math.isclose(float(loss), float(pref + nll), rel_tol=1e-5)
    assert float(nll) > 1.0  # a random model: the NLL term is far from zero
