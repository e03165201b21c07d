"""RLOO, REINFORCE++ (and its group baseline), ReMax, GSPO, CISPO and ``bnpo`` against hand-computed numbers.

Every expected value is written as the arithmetic of the paper's formula on small tensors, so a test fails if
the implementation drifts from the formula (not merely from a previous run of itself).
"""

from __future__ import annotations

import math

import pytest
import torch

from aa_lightning.algorithms.losses import (
    aggregate_token_loss,
    discounted_returns,
    global_normalize,
    grpo_loss,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
)


def t(x: list) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def close(a: torch.Tensor, b: float | list) -> None:
    torch.testing.assert_close(a.double(), torch.as_tensor(b, dtype=torch.float64), rtol=1e-6, atol=1e-9)


# -- advantage estimators ---------------------------------------------------------------------------------


def test_rloo_leave_one_out_baseline() -> None:
    # arXiv:2402.14740: A_i = r_i - mean of the other G-1 rewards of the prompt
    rewards = t([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    expected = [1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2, 0.0, 0.0, 0.0]
    close(rloo_advantages(rewards, 3), expected)
    # identity A = G/(G-1) * (r - mean): group 1 mean 3 -> 1.5 * (-2, -1, 3)
    close(rloo_advantages(rewards, 3)[:3], [1.5 * -2, 1.5 * -1, 1.5 * 3])
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(rewards, 1)
    with pytest.raises(ValueError, match="multiple"):
        rloo_advantages(rewards, 4)


def test_remax_greedy_baseline() -> None:
    # arXiv:2310.10505: A = r(x, y_sampled) - r(x, y_greedy); G=2 samples per prompt share the prompt's baseline
    rewards, greedy = t([1.0, 3.0, 0.5, 0.5]), t([2.0, 1.0])
    close(remax_advantages(rewards, greedy, 2), [1 - 2, 3 - 2, 0.5 - 1, 0.5 - 1])
    close(remax_advantages(t([0.25]), t([1.0])), [0.25 - 1.0])  # the paper's one sample per prompt
    with pytest.raises(ValueError, match="greedy_rewards"):
        remax_advantages(rewards, t([1.0, 2.0, 3.0]), 2)


def test_discounted_returns() -> None:
    # G_t = r_t + gamma * G_{t+1}; gamma 0.5 on (1, 2, 4): G_2 = 4, G_1 = 2 + 2 = 4, G_0 = 1 + 2 = 3
    close(discounted_returns(t([[1.0, 2.0, 4.0]]), torch.ones(1, 3), gamma=0.5), [[3.0, 4.0, 4.0]])
    # masked positions count 0 and are 0
    close(discounted_returns(t([[1.0, 2.0, 9.0]]), torch.tensor([[1, 1, 0]])), [[3.0, 2.0, 0.0]])


def test_reinforce_pp_without_kl_normalises_over_all_tokens() -> None:
    # arXiv:2501.03262. Scores (1, -1) land on the last response token; gamma 1: every token's return is the score
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = reinforce_pp_advantages(t([1.0, -1.0]), mask)
    # batch tokens: 1, 1, 1, -1, -1 -> mean 0.2, population var (3 * 0.8^2 + 2 * 1.2^2) / 5 = 0.96
    s = math.sqrt(0.96)
    close(adv, [[0.8 / s, 0.8 / s, 0.8 / s], [-1.2 / s, -1.2 / s, 0.0]])


def test_reinforce_pp_folds_the_kl_into_the_token_reward() -> None:
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    kl = t([[0.5, 0.0, 1.0], [0.2, 0.4, 9.0]])  # 9.0 sits on padding and must be ignored
    adv = reinforce_pp_advantages(t([1.0, -1.0]), mask, kl=kl, beta=0.1)
    # token rewards r_t = -0.1 * KL_t (+ score on the last token):
    #   row 0: (-0.05, 0, 1 - 0.1) -> returns (0.85, 0.9, 0.9); row 1: (-0.02, -1 - 0.04) -> returns (-1.06, -1.04)
    returns = [0.85, 0.9, 0.9, -1.06, -1.04]
    mean = sum(returns) / 5
    std = math.sqrt(sum((r - mean) ** 2 for r in returns) / 5)
    a = [(r - mean) / std for r in returns]
    close(adv, [[a[0], a[1], a[2]], [a[3], a[4], 0.0]])


def test_reinforce_pp_group_baseline() -> None:
    # REINFORCE++-baseline: scores centred on their group mean first: (1, 3 | 4, 4) -> (-1, 1 | 0, 0)
    mask = torch.ones(4, 2)
    adv = reinforce_pp_advantages(t([1.0, 3.0, 4.0, 4.0]), mask, group_size=2)
    # returns (-1, -1), (1, 1), (0, 0), (0, 0): mean 0, population var 4 / 8 = 0.5
    r2 = math.sqrt(2.0)
    close(adv, [[-r2, -r2], [r2, r2], [0.0, 0.0], [0.0, 0.0]])
    # without the baseline the same scores give other numbers (the global mean 3 is subtracted instead)
    assert not torch.allclose(reinforce_pp_advantages(t([1.0, 3.0, 4.0, 4.0]), mask), adv)
    with pytest.raises(ValueError, match="group_size >= 2"):
        reinforce_pp_advantages(t([1.0, 3.0]), torch.ones(2, 2), group_size=1)


def test_global_normalize_reduces_its_statistics_with_the_given_sum() -> None:
    values, mask = t([[1.0, 2.0], [4.0, 0.0]]), torch.tensor([[1, 1], [1, 0]])
    local = global_normalize(values, mask)
    mean, var = 7 / 3, ((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3
    close(
        local,
        [[(1 - mean) / math.sqrt(var), (2 - mean) / math.sqrt(var)], [(4 - mean) / math.sqrt(var), 0.0]],
    )
    # two ranks holding the same data: every sum doubles, the statistics do not change
    close(global_normalize(values, mask, reduce_sum=lambda x: 2 * x), local.tolist())


# -- policy losses ----------------------------------------------------------------------------------------

LOGP = t([[-1.0, -2.0], [-0.5, 9.0]])
OLD = t([[-1.2, -2.4], [-1.0, 0.0]])
MASK = torch.tensor([[1, 1], [1, 0]])
ADV = t([1.0, -1.0])


def test_gspo_sequence_ratio_is_the_geometric_mean_and_clips_per_sequence() -> None:
    # arXiv:2507.18071: s_i = exp(mean_t(logp - logp_old)); row 0: (0.2 + 0.4) / 2 = 0.3; row 1: 0.5 / 1
    s0, s1 = math.exp(0.3), math.exp(0.5)
    assert abs(s0 - (math.exp(0.2) * math.exp(0.4)) ** 0.5) < 1e-12  # geometric mean of the token ratios
    logp = LOGP.clone().requires_grad_(True)
    out = grpo_loss(logp, OLD, None, ADV, MASK, policy_loss="gspo", aggregation="sequence_mean")
    # row 0: A = 1, s0 = 1.35 > 1.2 -> -min(s0, 1.2) = -1.2 (clipped); row 1: A = -1 -> -min(-s1, -1.2) = s1
    close(out.loss, (-1.2 + s1) / 2)
    close(out.clip_fraction, 2 / 3)  # both tokens of row 0
    out.loss.backward()
    # d/dlogp[1,0] of s1 / 2 = s1 * (1 / |y_1|) / 2; the clipped row gets no gradient
    close(logp.grad, [[0.0, 0.0], [s1 / 2, 0.0]])
    tok = grpo_loss(LOGP, OLD, None, ADV, MASK, policy_loss="gspo", aggregation="token_mean")
    close(tok.loss, (2 * -1.2 + s1) / 3)  # the sequence loss broadcast to its tokens
    with pytest.raises(ValueError, match="one advantage per sequence"):
        grpo_loss(LOGP, OLD, None, torch.ones(2, 2), MASK, policy_loss="gspo")


def test_gspo_on_policy_gradient_is_the_length_normalised_reinforce_gradient() -> None:
    logp = LOGP.clone().requires_grad_(True)
    grpo_loss(logp, None, None, ADV, MASK, policy_loss="gspo", aggregation="sequence_mean").loss.backward()
    # s = 1: d/dlogp_t of -A * s / 2 = -A / |y| / 2
    close(logp.grad, [[-1 / 2 / 2, -1 / 2 / 2], [1 / 1 / 2, 0.0]])


def test_cispo_clips_the_stop_gradient_weight_and_keeps_every_token_gradient() -> None:
    # arXiv:2506.13585: l_t = -sg(clip(rho_t, 1 - low, 1 + high)) * A * logp_t
    logp, old, adv, mask = t([[-1.0, -0.5]]), t([[-1.5, -0.5]]), t([2.0]), torch.ones(1, 2)
    x = logp.clone().requires_grad_(True)
    out = grpo_loss(x, old, None, adv, mask, clip_range=1.0, clip_range_high=0.2, policy_loss="cispo")
    # rho = (e^0.5 = 1.65 -> weight 1.2, 1 -> weight 1): per token (-1.2 * 2 * -1.0, -1 * 2 * -0.5) = (2.4, 1.0)
    close(out.loss, (2.4 + 1.0) / 2)
    close(out.clip_fraction, 0.5)
    out.loss.backward()
    close(x.grad, [[-1.2 * 2 / 2, -1.0 * 2 / 2]])  # no gradient through the weight
    # PPO's clip drops the clipped token's gradient instead
    y = logp.clone().requires_grad_(True)
    grpo_loss(y, old, None, adv, mask, clip_range=1.0, clip_range_high=0.2).loss.backward()
    close(y.grad, [[0.0, -1.0 * 2 / 2]])
    with pytest.raises(ValueError, match="policy_loss"):
        grpo_loss(logp, old, None, adv, mask, policy_loss="bogus")


def test_bnpo_is_the_local_token_mean() -> None:
    per_token = t([[1.0, 2.0, 3.0], [10.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(aggregate_token_loss(per_token, mask, "bnpo"), (1 + 2 + 3 + 10) / 4)
    close(aggregate_token_loss(per_token, mask, "sequence_mean"), (2 + 10) / 2)  # differs
