"""Tests for aa_lightning.algorithms.losses.

Expected values are computed by hand from each paper's formula with ``math`` (never by calling the code
under test).
"""

from __future__ import annotations

import math

import pytest
import torch

from aa_lightning.algorithms.logprobs import sequence_log_probs
from aa_lightning.algorithms.losses import (
    aggregate_token_loss,
    compute_gae,
    cost_model_loss,
    dpo_loss,
    grpo_advantages,
    grpo_loss,
    kl_penalty,
    kto_kl_estimate,
    kto_loss,
    lagrange_multiplier_loss,
    lagrangian_advantage,
    orpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    reward_pairwise_loss,
    simpo_loss,
)


def t(x: list) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def softplus_neg(x: float) -> float:
    """-log sigmoid(x) = log(1 + exp(-x))."""
    return math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def close(a: torch.Tensor, b: float, tol: float = 1e-5) -> None:
    assert math.isclose(a.item(), b, rel_tol=tol, abs_tol=tol), (a.item(), b)


# ------------------------------------------------------------------ DPO family

# h = (pc - rc) - (pr - rr) = [1.5, 0.5]
PC, PR, RC, RR = t([-1.0, -2.0]), t([-3.0, -1.5]), t([-1.5, -2.0]), t([-2.0, -1.0])


def test_dpo_sigmoid() -> None:
    out = dpo_loss(PC, PR, RC, RR, beta=0.1)
    close(out.loss, (softplus_neg(0.15) + softplus_neg(0.05)) / 2)
    torch.testing.assert_close(out.chosen_rewards, t([0.05, 0.0]))
    torch.testing.assert_close(out.rejected_rewards, t([-0.1, -0.05]))
    assert not out.chosen_rewards.requires_grad


def test_dpo_cdpo_label_smoothing() -> None:
    out = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.25)
    e0 = 0.75 * softplus_neg(0.15) + 0.25 * softplus_neg(-0.15)
    e1 = 0.75 * softplus_neg(0.05) + 0.25 * softplus_neg(-0.05)
    close(out.loss, (e0 + e1) / 2)


@pytest.mark.parametrize(("beta", "expected"), [(1.0, 0.25), (0.5, 0.5)])
def test_dpo_hinge(beta: float, expected: float) -> None:
    # relu(1 - beta*h): beta=1 -> [0, 0.5]; beta=0.5 -> [0.25, 0.75]
    close(dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="hinge").loss, expected)


@pytest.mark.parametrize(("beta", "expected"), [(0.5, 0.25), (0.25, 1.25)])
def test_dpo_ipo(beta: float, expected: float) -> None:
    # (h - 1/(2 beta))^2: beta=0.5 -> [0.25, 0.25]; beta=0.25 -> [0.25, 2.25]
    close(dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="ipo").loss, expected)


def test_dpo_unknown_loss_type() -> None:
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, loss_type="nope")


def test_dpo_from_padded_sequences() -> None:
    # 2-token vocabulary, all-zero logits -> every response token has log-prob log(1/2).
    # chosen: 3 response tokens (one padding), rejected: 1 response token.
    logits = torch.zeros(2, 4, 2)
    labels = torch.tensor([[-100, 1, 0, 1], [-100, 0, -100, -100]])
    lp = sequence_log_probs(logits, labels)
    ref = t([-1.0, -1.0])
    out = dpo_loss(lp.sum[:1], lp.sum[1:], ref[:1], ref[1:], beta=0.5)
    h = (3 * math.log(0.5) + 1.0) - (math.log(0.5) + 1.0)
    close(out.loss, softplus_neg(0.5 * h))


def test_simpo() -> None:
    c, r = t([-0.5, -1.0]), t([-1.0, -0.8])
    out = simpo_loss(c, r, beta=2.0, gamma=0.5)
    # beta*c - beta*r - gamma = [0.5, -0.9]
    close(out.loss, (softplus_neg(0.5) + softplus_neg(-0.9)) / 2)
    torch.testing.assert_close(out.chosen_rewards, t([-1.0, -2.0]))
    torch.testing.assert_close(out.rejected_rewards, t([-2.0, -1.6]))
    smooth = simpo_loss(c, r, beta=2.0, gamma=0.5, label_smoothing=0.1)
    e0 = 0.9 * softplus_neg(0.5) + 0.1 * softplus_neg(-0.5)
    e1 = 0.9 * softplus_neg(-0.9) + 0.1 * softplus_neg(0.9)
    close(smooth.loss, (e0 + e1) / 2)


def _log_odds(x: float) -> float:
    return x - math.log(1.0 - math.exp(x))


def test_orpo() -> None:
    c, r = t([-0.5, -0.05]), t([-1.2, -2.0])
    out = orpo_loss(c, r, torch.tensor(0.7), lambda_=0.1)
    lor = [_log_odds(-0.5) - _log_odds(-1.2), _log_odds(-0.05) - _log_odds(-2.0)]
    or_term = (softplus_neg(lor[0]) + softplus_neg(lor[1])) / 2
    torch.testing.assert_close(out.log_odds_ratio, t(lor))
    close(out.or_loss, or_term)
    close(out.nll_loss, 0.7)
    close(out.loss, 0.7 + 0.1 * or_term)


def test_orpo_near_zero_logp_is_stable() -> None:
    c = torch.tensor([-1e-6], requires_grad=True)
    r = t([-3.0])
    out = orpo_loss(c, r, torch.tensor([0.2, 0.4]), lambda_=1.0)
    lor = (-1e-6 - math.log(-math.expm1(-1e-6))) - _log_odds(-3.0)
    close(out.log_odds_ratio, lor, tol=1e-4)
    close(out.nll_loss, 0.3)
    out.loss.backward()
    assert torch.isfinite(c.grad).all()


def test_kto_mixed_batch() -> None:
    policy, ref = t([-1.0, -2.0, -3.0]), t([-1.5, -1.5, -2.0])  # rho = [0.5, -0.5, -1.0]
    desirable = torch.tensor([True, False, True])
    out = kto_loss(policy, ref, desirable, torch.tensor(0.2), beta=0.5, undesirable_weight=1.5)
    l0 = 1 - sig(0.5 * (0.5 - 0.2))
    l1 = 1.5 * (1 - sig(0.5 * (0.2 + 0.5)))
    l2 = 1 - sig(0.5 * (-1.0 - 0.2))
    torch.testing.assert_close(out.losses, t([l0, l1, l2]))
    close(out.loss, (l0 + l1 + l2) / 3)
    torch.testing.assert_close(out.rewards, t([0.25, -0.25, -0.5]))


def test_kto_single_class_and_negative_kl_clamped() -> None:
    policy, ref = t([-1.0, -2.0]), t([-1.5, -1.0])  # rho = [0.5, -1.0]
    out = kto_loss(policy, ref, torch.tensor([False, False]), torch.tensor(-0.3), beta=0.1)
    # z0 = max(-0.3, 0) = 0
    close(out.loss, ((1 - sig(0.1 * (0 - 0.5))) + (1 - sig(0.1 * (0 + 1.0)))) / 2)
    close(out.kl, 0.0)


def test_kto_kl_estimate() -> None:
    close(kto_kl_estimate(t([-1.0, -2.0]), t([-1.5, -2.5])), 0.5)
    close(kto_kl_estimate(t([-2.0, -2.0]), t([-1.0, -1.5])), 0.0)
    assert not kto_kl_estimate(torch.zeros(2, requires_grad=True), torch.zeros(2)).requires_grad


# ------------------------------------------------------------------ reward / cost models


def test_reward_pairwise_plain() -> None:
    out = reward_pairwise_loss(t([1.0, -0.5, 0.2]), t([0.0, 0.5, 0.2]))
    close(out.loss, (softplus_neg(1.0) + softplus_neg(-1.0) + math.log(2.0)) / 3)
    close(out.accuracy, 1.0 / 3.0)


def test_reward_pairwise_margin_and_center() -> None:
    out = reward_pairwise_loss(
        t([1.0, -0.5, 0.2]), t([0.0, 0.5, 0.2]), margin=t([0.5, 0.0, 1.0]), center_coef=0.01
    )
    # diffs - margin = [0.5, -1, -1]; (c + r)^2 = [1, 0, 0.16]
    expected = (softplus_neg(0.5) + 2 * softplus_neg(-1.0)) / 3 + 0.01 * (1.0 + 0.0 + 0.16) / 3
    close(out.loss, expected)


@pytest.mark.parametrize(
    ("safer_is_safe", "expected_terms", "sign_acc"),
    [
        # ex1 safer labelled unsafe (s=+1): term -logsig(0.5)
        ([True, False], [softplus_neg(0.5)], 1.0),
        # ex1 safer labelled safe (s=-1) but cost 0.5 > 0: term -logsig(-0.5), sign wrong
        ([True, True], [softplus_neg(-0.5)], 0.75),
    ],
)
def test_cost_model_loss(safer_is_safe: list[bool], expected_terms: list[float], sign_acc: float) -> None:
    safer, unsafer = t([-1.0, 0.5]), t([2.0, 0.3])
    out = cost_model_loss(safer, unsafer, torch.tensor(safer_is_safe), torch.tensor([False, False]))
    ex0 = softplus_neg(3.0) + softplus_neg(2.0) + softplus_neg(1.0)
    ex1 = softplus_neg(-0.2) + softplus_neg(0.3) + expected_terms[0]
    close(out.loss, (ex0 + ex1) / 2)
    close(out.accuracy, 0.5)
    close(out.sign_accuracy, sign_acc)


# ------------------------------------------------------------------ RL


def test_kl_penalty_estimators() -> None:
    logp, ref = t([[-1.0, -2.0]]), t([[-1.5, -1.0]])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), t([[0.5, -1.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), t([[0.125, 0.5]]))
    torch.testing.assert_close(
        kl_penalty(logp, ref, "k3"), t([[math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 2.0]])
    )
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")


def test_compute_gae_2x3_with_masked_last_token() -> None:
    rewards = t([[0.1, 0.0, 1.0], [0.0, 2.0, 7.0]])
    values = t([[0.5, 0.4, 0.3], [0.2, 0.6, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: A2 = 1 - 0.3 = 0.7; A1 = (0.27 - 0.4) + 0.72*0.7 = 0.374; A0 = (0.1 + 0.36 - 0.5) + 0.72*0.374
    # row 1: last token masked -> V=0 there; A1 = 2 - 0.6 = 1.4; A0 = (0.54 - 0.2) + 0.72*1.4 = 1.348
    torch.testing.assert_close(adv, t([[0.22928, 0.374, 0.7], [1.348, 1.4, 0.0]]))
    torch.testing.assert_close(ret, t([[0.72928, 0.774, 1.0], [1.548, 2.0, 0.0]]))


def test_compute_gae_gamma_one_lambda_one_is_monte_carlo() -> None:
    rewards = t([[0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    values = t([[0.3, 0.1, 0.2, 9.0], [0.4, 0.4, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, t([[1.0, 1.0, 1.0, 0.0], [1.0, 0.5, 0.0, 0.0]]))
    torch.testing.assert_close(adv, t([[0.7, 0.9, 0.8, 0.0], [0.6, 0.1, 0.0, 0.0]]))


# PPO policy case: ratios e^0, e^0.5, e^-0.5 / e^0.2, e^0, (masked)
PPO_LOGP = t([[-1.0, -0.5, -2.0], [-1.0, -1.0, 0.0]])
PPO_OLD = t([[-1.0, -1.0, -1.5], [-1.2, -1.0, 5.0]])
PPO_ADV = t([[1.0, 1.0, -1.0], [-2.0, 0.5, 3.0]])
PPO_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# per token: -1, -1.2 (clipped), 0.8 (clipped), 2*e^0.2 (unclipped), -0.5
PPO_TOKENS = [[-1.0, -1.2, 0.8], [2.0 * math.exp(0.2), -0.5]]


def test_ppo_policy_loss_token_mean() -> None:
    out = ppo_policy_loss(PPO_LOGP, PPO_OLD, PPO_ADV, PPO_MASK, clip_range=0.2)
    close(out.loss, (sum(PPO_TOKENS[0]) + sum(PPO_TOKENS[1])) / 5)
    close(out.clip_fraction, 2 / 5)
    close(out.approx_kl, 0.5 * (0.0 + 0.25 + 0.25 + 0.04 + 0.0) / 5)


def test_ppo_policy_loss_sequence_mean() -> None:
    out = ppo_policy_loss(PPO_LOGP, PPO_OLD, PPO_ADV, PPO_MASK, clip_range=0.2, aggregation="sequence_mean")
    close(out.loss, (sum(PPO_TOKENS[0]) / 3 + sum(PPO_TOKENS[1]) / 2) / 2)


def test_ppo_policy_loss_on_policy_gradient() -> None:
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    adv = t([[1.0, 2.0], [-3.0, 4.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    out = ppo_policy_loss(logp, logp.detach(), adv, mask)
    close(out.loss, -(1.0 + 2.0 - 3.0) / 3)
    close(out.clip_fraction, 0.0)
    out.loss.backward()
    # d/dlogp of -ratio*A at ratio=1 is -A / n_tokens
    torch.testing.assert_close(logp.grad, t([[-1.0 / 3, -2.0 / 3], [1.0, 0.0]]))


def test_ppo_value_loss() -> None:
    values = t([[1.0, 0.5], [2.0, 0.0]])
    old = t([[0.9, 0.0], [1.0, 0.0]])
    returns = t([[1.5, 1.0], [1.0, 9.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    out = ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    # max terms: 0.25 (no clip), 0.64 (clipped v=0.2), 1.0 (unclipped larger)
    close(out.loss, 0.5 * (0.25 + 0.64 + 1.0) / 3)
    close(out.clip_fraction, 1 / 3)
    out_wide = ppo_value_loss(values, old, returns, mask, clip_range_value=10.0)
    close(out_wide.loss, 0.5 * (0.25 + 0.25 + 1.0) / 3)
    close(out_wide.clip_fraction, 0.0)


def test_grpo_advantages() -> None:
    rewards = t([1.0, 2.0, 3.0, 0.0, 0.0, 6.0, 5.0, 5.0, 5.0])
    s12 = math.sqrt(12.0)  # group 2: deviations (-2, -2, 4), unbiased var 24/2
    expected = [-1 / 1.0001, 0.0, 1 / 1.0001, -2 / (s12 + 1e-4), -2 / (s12 + 1e-4), 4 / (s12 + 1e-4), 0, 0, 0]
    torch.testing.assert_close(grpo_advantages(rewards, 3), t(expected))
    torch.testing.assert_close(grpo_advantages(rewards, 3, scale="none"), t([-1, 0, 1, -2, -2, 4, 0, 0, 0]))
    with pytest.raises(ValueError):
        grpo_advantages(rewards, 4)
    with pytest.raises(ValueError):
        grpo_advantages(rewards, 3, scale="bogus")


# GRPO on-policy case with a padded second row (garbage in padded positions)
G_LOGP = t([[-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0]])
G_REF = t([[-1.0, -1.5, -0.5], [-1.0, 5.0, 5.0]])
G_ADV = t([1.0, -2.0])
G_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])
_K3 = [0.0, math.exp(-0.5) + 0.5 - 1.0, math.exp(0.5) - 0.5 - 1.0, math.exp(1.0) - 2.0]
_ROW0 = [-1.0 + 0.1 * k for k in _K3[:3]]
_ROW1 = 2.0 + 0.1 * _K3[3]


@pytest.mark.parametrize(
    ("aggregation", "max_len", "expected"),
    [
        ("token_mean", None, (sum(_ROW0) + _ROW1) / 4),
        ("sequence_mean", None, (sum(_ROW0) / 3 + _ROW1) / 2),
        ("constant", 4, (sum(_ROW0) + _ROW1) / 8),
        ("constant", None, (sum(_ROW0) + _ROW1) / 6),
    ],
)
def test_grpo_loss_aggregations(aggregation: str, max_len: int | None, expected: float) -> None:
    out = grpo_loss(
        G_LOGP, None, G_REF, G_ADV, G_MASK, beta=0.1, aggregation=aggregation, max_completion_length=max_len
    )
    close(out.loss, expected)
    close(out.kl, sum(_K3) / 4)
    close(out.clip_fraction, 0.0)


def test_grpo_loss_clipping_without_reference() -> None:
    logp, old, adv, mask = t([[-0.5, -3.0]]), t([[-1.0, 0.0]]), t([1.0]), torch.tensor([[1, 0]])
    out = grpo_loss(logp, old, None, adv, mask)
    close(out.loss, -1.2)  # ratio e^0.5 clipped to 1.2
    close(out.clip_fraction, 1.0)
    close(out.kl, 0.0)
    close(grpo_loss(logp, old, None, adv, mask, clip_range_high=0.28).loss, -1.28)
    with pytest.raises(ValueError):
        aggregate_token_loss(logp, mask, "bogus")


def test_lagrangian_advantage() -> None:
    out = lagrangian_advantage(t([1.0, -0.5]), t([0.5, 2.0]), 0.5)
    torch.testing.assert_close(out, t([0.75 / 1.5, -1.5 / 1.5]))
    out2 = lagrangian_advantage(t([1.0]), t([3.0]), torch.tensor(0.0, requires_grad=True))
    torch.testing.assert_close(out2, t([1.0]))
    assert not out2.requires_grad


@pytest.mark.parametrize(("cost", "loss", "grad"), [(3.0, -4.0, -4.0), (0.5, 1.0, 1.0)])
def test_lagrange_multiplier_loss(cost: float, loss: float, grad: float) -> None:
    log_lambda = torch.tensor(math.log(2.0), requires_grad=True)
    out = lagrange_multiplier_loss(log_lambda, torch.tensor(cost), cost_limit=1.0)
    close(out, loss)  # -2 * (cost - 1)
    out.backward()
    close(log_lambda.grad, grad)  # descent raises lambda iff cost > limit
