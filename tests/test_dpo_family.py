"""Formula tests for the DPO family's pair losses: each expected value worked out by hand with ``math``.

Inputs: ``c = pc - rc = [0.5, 0.0]``, ``r = pr - rr = [-1.0, -0.5]``, ``h = c - r = [1.5, 0.5]``.
"""

from __future__ import annotations

import math

import pytest
import torch

from aa_lightning.algorithms.losses import dpo_loss

PC, PR, RC, RR = (torch.tensor(v) for v in ([-1.0, -2.0], [-3.0, -1.5], [-1.5, -2.0], [-2.0, -1.0]))
C, R, H = [0.5, 0.0], [-1.0, -0.5], [1.5, 0.5]


def ls(x: float) -> float:
    """log sigma(x)."""
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def loss(loss_type: str, beta: float, eps: float = 0.0) -> float:
    return dpo_loss(PC, PR, RC, RR, beta=beta, loss_type=loss_type, label_smoothing=eps).loss.item()


def test_robust_is_unbiased_dpo_under_label_noise() -> None:
    b, e = 0.5, 0.2  # rDPO eq. 8: [(1-e) (-log s(bh)) - e (-log s(-bh))] / (1 - 2e)
    want = mean([((1 - e) * -ls(b * h) - e * -ls(-b * h)) / (1 - 2 * e) for h in H])
    assert math.isclose(loss("robust", b, e), want, rel_tol=1e-5)
    assert math.isclose(loss("robust", b, 0.0), loss("sigmoid", b), rel_tol=1e-6)  # e = 0: DPO
    with pytest.raises(ValueError, match="0.5"):
        loss("robust", b, 0.5)


def test_exo_pair_is_reverse_kl_to_the_smoothed_label() -> None:
    b, e = 1.0, 1e-3  # EXO eq. 13, K = 2: s(z)(log s(z) - log(1-e)) + s(-z)(log s(-z) - log e)
    want = mean(
        [sig(b * h) * (ls(b * h) - math.log(1 - e)) + sig(-b * h) * (ls(-b * h) - math.log(e)) for h in H]
    )
    assert math.isclose(loss("exo_pair", b), want, rel_tol=1e-5)  # eps defaults to 1e-3
    e = 0.1
    want = mean(
        [sig(b * h) * (ls(b * h) - math.log(1 - e)) + sig(-b * h) * (ls(-b * h) - math.log(e)) for h in H]
    )
    assert math.isclose(loss("exo_pair", b, e), want, rel_tol=1e-5)


def test_nca_pair() -> None:
    b = 0.5  # NCA eq. 11, K = 2: -log s(b c) - 1/2 log s(-b c) - 1/2 log s(-b r)
    want = mean([-ls(b * c) - 0.5 * ls(-b * c) - 0.5 * ls(-b * r) for c, r in zip(C, R)])
    assert math.isclose(loss("nca_pair", b), want, rel_tol=1e-5)


def test_bco_pair_shifts_by_the_mean_reward() -> None:
    b = 0.5
    delta = mean([b * x for x in C + R])  # (0.25 + 0 - 0.5 - 0.25) / 4 = -0.125
    assert math.isclose(delta, -0.125)
    want = mean([-ls(b * c - delta) - ls(-(b * r - delta)) for c, r in zip(C, R)])
    assert math.isclose(loss("bco_pair", b), want, rel_tol=1e-5)


def test_sppo_hard_regresses_log_ratios_to_plus_minus_half_eta() -> None:
    b = 0.5  # eta = 1/b = 2: targets +1 and -1
    want = mean([(c - 1.0) ** 2 + (r + 1.0) ** 2 for c, r in zip(C, R)])  # [0.25 + 0, 1 + 0.25] -> 0.75
    assert math.isclose(want, 0.75)
    assert math.isclose(loss("sppo_hard", b), want, rel_tol=1e-6)


def test_aot_matches_sorted_quantiles() -> None:
    b = 1.0
    # paired: policy margins pc - pr = [2.0, -0.5] -> sorted [-0.5, 2.0]; reference rc - rr = [0.5, -1.0]
    # -> sorted [-1.0, 0.5]; quantile differences [0.5, 1.5]
    assert math.isclose(loss("aot", b), mean([-ls(0.5), -ls(1.5)]), rel_tol=1e-5)
    # unpaired: sorted c = [0.0, 0.5], sorted r = [-1.0, -0.5]: differences [1.0, 1.0]
    assert math.isclose(loss("aot_unpaired", b), -ls(1.0), rel_tol=1e-5)
    e = 0.1
    assert math.isclose(loss("aot_unpaired", b, e), -(1 - e) * ls(1.0) - e * ls(-1.0), rel_tol=1e-5)


def test_aot_with_one_pair_is_dpo() -> None:
    one = [x[:1] for x in (PC, PR, RC, RR)]
    for name in ("aot", "aot_unpaired"):
        out = dpo_loss(*one, beta=0.5, loss_type=name).loss
        assert math.isclose(out.item(), -ls(0.5 * 1.5), rel_tol=1e-6)


def test_apo_zero_and_apo_down() -> None:
    b = 0.5
    zero = mean([(1 - sig(b * c)) + sig(b * r) for c, r in zip(C, R)])
    down = mean([sig(b * c) + (1 - sig(b * (c - r))) for c, r in zip(C, R)])
    assert math.isclose(loss("apo_zero", b), zero, rel_tol=1e-5)
    assert math.isclose(loss("apo_down", b), down, rel_tol=1e-5)


def test_discopop_blends_logistic_and_exponential() -> None:
    b, tau = 0.5, 0.05  # rho = b h; w = s(rho / tau); (1 - w)(-log s(rho)) + w exp(-rho)
    want = mean([(1 - sig(b * h / tau)) * -ls(b * h) + sig(b * h / tau) * math.exp(-b * h) for h in H])
    assert math.isclose(loss("discopop", b), want, rel_tol=1e-5)


def test_sigmoid_norm_is_the_sigmoid_formula() -> None:
    """The length normalisation is in the inputs (DPOModule passes per-token means); the formula is DPO's."""
    assert math.isclose(loss("sigmoid_norm", 0.5), mean([-ls(0.5 * h) for h in H]), rel_tol=1e-6)


@pytest.mark.parametrize(
    "name",
    [
        "robust",
        "exo_pair",
        "nca_pair",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "discopop",
    ],
)
def test_new_losses_fall_as_the_chosen_log_ratio_rises(name: str) -> None:
    """Every loss prefers a larger chosen log-ratio (apo_down by design lowers both, so it is left out)."""
    pc = PC.clone().requires_grad_(True)
    dpo_loss(pc, PR, RC, RR, beta=0.5, loss_type=name).loss.backward()
    assert (pc.grad < 0).all(), pc.grad


def test_every_loss_type_is_selectable_from_a_config() -> None:
    """The ``Literal`` the CLI reads lists exactly the names ``dpo_loss`` knows."""
    from typing import get_args

    from aa_lightning.algorithms.dpo import DPOLossType
    from aa_lightning.algorithms.losses.pairwise import DPO_LOSS_TYPES

    assert set(get_args(DPOLossType)) == set(DPO_LOSS_TYPES)
