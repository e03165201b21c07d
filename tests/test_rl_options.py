"""GRPOModule's advantage estimators, policy losses and ``bnpo`` aggregation on the small task of
tests/test_rl_modules.py (tiny random Qwen2, reward = share of the letter "e").

Each option must LEARN (the mean reward of the last rollouts clearly above the first ones within a fixed
number of rollouts), refuse the combinations that cannot work, and leave the default GRPO untouched.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from test_rl_modules import E_SHARE, Recorder, datamodule, fit

from aa_lightning.algorithms import GenerationConfig, GRPOModule, OptimConfig


def grpo(**kwargs: Any) -> GRPOModule:
    args: dict[str, Any] = dict(
        model_name_or_path="tiny-qwen2",
        reward_functions=E_SHARE,
        num_generations=4,
        beta=0.0,
        generation=GenerationConfig(max_new_tokens=4),
        sample_log_interval=0,
        optim=OptimConfig(lr=3e-2, warmup_steps=0, scheduler="constant"),
    )
    args.update(kwargs)
    return GRPOModule(**args)


@pytest.mark.parametrize(
    "options",
    [
        {"advantage_estimator": "rloo"},
        {"advantage_estimator": "reinforce_pp", "beta": 0.01},
        {"advantage_estimator": "reinforce_pp_baseline"},
        {"advantage_estimator": "remax", "num_generations": 2},
        {"policy_loss": "gspo", "loss_aggregation": "sequence_mean", "num_mini_batches": 2},
        {"policy_loss": "cispo", "clip_range": 1.0, "clip_range_high": 0.28, "num_mini_batches": 2},
        {"loss_aggregation": "bnpo", "num_mini_batches": 2},
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_option_raises_reward(repo_path: Any, options: dict[str, Any]) -> None:
    pl.seed_everything(0)
    module = grpo(**options)
    rec = Recorder()
    batch = 16 if options.get("num_generations") == 2 else 8  # the same number of responses per rollout
    fit(module, datamodule(repo_path, batch_size=batch), 10, rec)
    scores = rec.series("rollout/score")
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.1 and last > 1.8 * first, scores
    if options.get("beta"):  # REINFORCE++: the KL lives in the reward, not in the loss
        assert module.ref_model is not None and rec.rows[-1]["rollout/kl"] != 0.0
        assert rec.rows[-1]["train/kl"] == 0.0
    if options.get("advantage_estimator") == "remax":
        assert "rollout/greedy_score" in rec.rows[-1]


def test_remax_baseline_is_the_greedy_response_score(repo_path: Any) -> None:
    """The ReMax advantages equal sampled score minus the score of a separate greedy decoding."""
    pl.seed_everything(0)
    module = grpo(advantage_estimator="remax", num_generations=2)
    dm = datamodule(repo_path, batch_size=4, size=8, kind="prompt_only")
    module.configure_model()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    rollout, _ = module.experience(batch)
    greedy = module.generate_rollout(batch, num_samples=1, do_sample=False)
    greedy_scores = module.compute_scores(greedy)[0].float()
    expected = rollout["rewards"].float() - greedy_scores.repeat_interleave(2)
    torch.testing.assert_close(rollout["advantages"], expected)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"advantage_estimator": "rloo", "num_generations": 1}, "num_generations >= 2"),
        ({"num_generations": 1}, "num_generations >= 2"),
        ({"advantage_estimator": "rloo", "scale": "none"}, "scale='none' applies to"),
        ({"advantage_estimator": "reinforce_pp", "policy_loss": "gspo"}, "one advantage per sequence"),
    ],
)
def test_invalid_combinations_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        grpo(**options)


def test_single_sample_estimators_accept_one_generation() -> None:
    assert grpo(advantage_estimator="remax", num_generations=1).num_generations == 1
    assert grpo(advantage_estimator="reinforce_pp", num_generations=1).num_generations == 1
