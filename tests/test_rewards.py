"""Reward registry and built-in rule-based rewards (GSM8K answer check, format, target share, length)."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from aa_lightning.rewards import (
    RewardSpec,
    WeightedRewards,
    available_rewards,
    extract_final_answer,
    get_reward,
    register_reward,
)


def test_builtins_are_registered() -> None:
    assert {"gsm8k_answer", "format", "target_token_share", "response_length"} <= set(available_rewards())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She sold 48/2 = <<48/2=24>>24 clips.\n#### 1,080", "1080"),
        ("so x = 3 and then \\boxed{42} is the result, not 7", "42"),
        ("\\boxed{\\frac{1}{2}} and later \\boxed{3.50}", "3.5"),
        ("The answer is: $18.", "18"),
        ("first 12 then 15 apples, finally 19", "19"),
        ("#### 5 but at the very end we say 6", "5"),  # an explicit marker wins over a trailing number
        ("-3 degrees", "-3"),
        ("no digits here", None),
    ],
)
def test_extract_final_answer(text: str, expected: str | None) -> None:
    assert extract_final_answer(text) == expected


def test_gsm8k_answer_compares_numbers_and_needs_reference() -> None:
    fn = get_reward("gsm8k_answer")
    metas = [{"reference_answer": "1080"}, {"reference_answer": "72"}, {"reference_answer": "5"}]
    responses = ["Total: $1,080.00", "48 + 24 = 72\n#### 72", "I think it is 6."]
    assert fn(["q"] * 3, responses, metas) == [1.0, 1.0, 0.0]
    assert fn(["q"], ["#### 3"], [{"reference_answer": "3"}], correct=2.0) == [2.0]
    with pytest.raises(KeyError, match="reference_answer"):
        fn(["q"], ["#### 3"], [{}])


def test_format_reward() -> None:
    fn = get_reward("format")
    responses = ["Work: 2+2=4\n#### 4", "#### 4 and then more text", "4", "#### 1,234.5 "]
    assert fn(["q"] * 4, responses, [{}] * 4) == [1.0, 0.0, 0.0, 1.0]
    assert fn(["q"], ["Answer: yes"], [{}], pattern=r"Answer: (yes|no)", mode="fullmatch") == [1.0]


def test_target_token_share_and_length() -> None:
    share = get_reward("target_token_share")
    values = share(["p"] * 4, [" the the", "the end", "", "xyz"], [{}] * 4, target=" the")
    assert values[0] == pytest.approx(1.0)
    assert values[1] == pytest.approx(0.0)  # "the" at the start has no leading space
    assert values[2] == 0.0 and values[3] == 0.0
    assert share(["p"], ["eeab"], [{}], target="e") == [pytest.approx(0.5)]
    assert get_reward("response_length")(["p"], ["abcd"], [{}], scale=2.0) == [2.0]


def test_register_custom_and_batched_rewards() -> None:
    @register_reward("test_mentions_paris")
    def mentions_paris(prompt: str, response: str, meta: dict) -> float:
        return float("paris" in response.lower()) + meta.get("bonus", 0.0)

    @register_reward("test_batched_len", batched=True)
    def batched_len(prompts: list[str], responses: list[str], metas: list[dict]) -> list[float]:
        return [len(r) for r in responses]

    combo = WeightedRewards(
        [RewardSpec("test_mentions_paris", weight=2.0), {"name": "test_batched_len", "weight": 0.5}]
    )
    total, parts = combo(["p", "p"], ["Paris!", "Rome"], [{"bonus": 1.0}, {}])
    torch.testing.assert_close(parts["test_mentions_paris"], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(parts["test_batched_len"], torch.tensor([6.0, 4.0]))
    torch.testing.assert_close(total, torch.tensor([2 * 2.0 + 0.5 * 6, 0.0 + 0.5 * 4]))

    # re-registering the same function (a re-run notebook cell) is fine; a different one needs override=True
    register_reward("test_mentions_paris")(mentions_paris)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_mentions_paris")(lambda p, r, m: 0.0)
    register_reward("test_mentions_paris", override=True)(lambda p, r, m: 0.5)
    assert get_reward("test_mentions_paris")(["p"], ["x"], [{}]) == [0.5]


def test_reward_by_import_path_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("user_rewards_for_test")
    module.shout = lambda prompt, response, meta: float(response.isupper())
    monkeypatch.setitem(sys.modules, "user_rewards_for_test", module)
    assert get_reward("user_rewards_for_test:shout")(["p", "p"], ["HI", "hi"], [{}, {}]) == [1.0, 0.0]

    with pytest.raises(KeyError, match="unknown reward function 'nope'"):
        get_reward("nope")
    with pytest.raises(KeyError):
        WeightedRewards([RewardSpec("nope")])  # unknown names fail when the module is built, not mid-run

    @register_reward("test_nan_reward")
    def nan_reward(prompt: str, response: str, meta: dict) -> float:
        return math.nan

    with pytest.raises(ValueError, match="non-finite"):
        get_reward("test_nan_reward")(["p"], ["r"], [{}])
