"""DAPO's dynamic sampling and overlong reward shaping (arXiv:2503.14476) as options of GRPOModule.

On the tiny random Qwen2 with the ``target_token_share`` reward of tests/test_rl_modules.py: the formula against
hand numbers, the group filter, the merge of rounds (log-probs of merged rollouts equal those of each round),
learning with dynamic sampling on, the round cap, and exact resume from a checkpoint taken between two rounds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from test_rl_modules import E_SHARE, datamodule, fit

from aa_lightning.algorithms import GenerationConfig, GRPOModule, OptimConfig
from aa_lightning.algorithms.losses import overlong_penalty
from aa_lightning.algorithms.rl.dynamic_sampling import concat_rollouts, group_rows, varied_groups
from aa_lightning.rewards import RewardSpec

NEVER = [RewardSpec("target_token_share", kwargs={"target": "\x00"})]  # 0 for every response


class StepRecorder(pl.Callback):
    """The logged metrics after each optimizer update (batches that only generated a round are skipped)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.last_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.last_step = trainer.global_step  # a resumed run starts at the checkpoint's step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step != self.last_step:
            self.last_step = trainer.global_step
            self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    def series(self, key: str) -> list[float]:
        return [row[key] for row in self.rows]


def grpo(**kwargs: Any) -> GRPOModule:
    args: dict[str, Any] = dict(
        model_name_or_path="tiny-qwen2",
        reward_functions=E_SHARE,
        num_generations=4,
        beta=0.0,
        dynamic_sampling=True,
        generation=GenerationConfig(max_new_tokens=4),
        sample_log_interval=0,
        optim=OptimConfig(lr=3e-2, warmup_steps=0, scheduler="constant"),
    )
    args.update(kwargs)
    return GRPOModule(**args)


# --------------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------------


def test_overlong_penalty_matches_the_paper_formula_by_hand() -> None:
    # L_max = 10, L_cache = 4: no penalty up to 10 - 4 = 6 tokens, then ((10 - 4) - |y|) / 4, -1 beyond 10
    lengths = torch.tensor([0, 3, 6, 7, 8, 9, 10, 12])
    expected = [0.0, 0.0, 0.0, (6 - 7) / 4, (6 - 8) / 4, (6 - 9) / 4, (6 - 10) / 4, -1.0]
    assert expected[3:7] == [-0.25, -0.5, -0.75, -1.0]
    assert overlong_penalty(lengths, 10, 4).tolist() == pytest.approx(expected)
    assert overlong_penalty(lengths, 10, 4, factor=0.5).tolist() == pytest.approx([0.5 * e for e in expected])
    # L_cache = L_max: the penalty is linear from the first token on
    assert overlong_penalty(torch.tensor([0, 1, 2]), 2, 2).tolist() == pytest.approx([0.0, -0.5, -1.0])
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(lengths, 4, 5)


def test_varied_groups_and_their_rows() -> None:
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.2, 0.2, 0.2, 0.2])  # G = 3 and G = 4
    assert varied_groups(rewards, 3).tolist() == [False, True, True, False]
    assert varied_groups(rewards, 4).tolist() == [True, True, False]
    assert group_rows(torch.tensor([1, 3]), 3).tolist() == [3, 4, 5, 9, 10, 11]


def test_merged_rounds_give_the_same_logprobs_as_each_round(repo_path: Any) -> None:
    """Two rounds with different prompt and response lengths: the re-padded merge changes no log-prob."""
    pl.seed_everything(0)
    module = grpo(generation=GenerationConfig(max_new_tokens=5))
    module.configure_model()
    dm = datamodule(repo_path, batch_size=2, size=8, kind="prompt_only")
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    parts = []
    for _ in range(3):
        parts.append(module.sample_and_score(next(loader))[0])
        module._rollout_index += 1
    lengths = {(p.prompt_length, p.response_length) for p in parts}
    assert len({pl_ for pl_, _ in lengths}) > 1, "the test needs rounds with different prompt lengths"
    merged = concat_rollouts(parts, module.tokenizer.pad_token_id)
    assert len(merged) == sum(len(p) for p in parts)
    logprobs, _ = module.response_log_probs(module.model, merged)
    row = 0
    for part in parts:
        alone, _ = module.response_log_probs(module.model, part)
        n, r = len(part), part.response_length
        got = logprobs[row : row + n]
        torch.testing.assert_close(
            got[:, :r][part.response_mask], alone[part.response_mask], atol=1e-5, rtol=1e-5
        )
        assert not merged.response_mask[row : row + n, r:].any()
        torch.testing.assert_close(merged["rewards"][row : row + n], part["rewards"])
        assert merged.responses[row : row + n] == part.responses
        row += n


# --------------------------------------------------------------------------------------------------
# GRPO with the DAPO options
# --------------------------------------------------------------------------------------------------


def test_overlong_penalty_is_added_to_the_rewards(repo_path: Any) -> None:
    pl.seed_everything(0)
    module = grpo(
        overlong_buffer_length=3, generation=GenerationConfig(max_new_tokens=6), dynamic_sampling=False
    )
    module.configure_model()
    dm = datamodule(repo_path, batch_size=4, size=8, kind="prompt_only")
    dm.setup("fit")
    rollout, stats = module.sample_and_score(next(iter(dm.train_dataloader())))
    lengths = rollout.response_mask.sum(dim=1).tolist()
    # L_max = max_new_tokens = 6, L_cache = 3: 0 up to 3 tokens, then (3 - |y|) / 3
    by_hand = [min(0.0, (3 - n) / 3) for n in lengths]
    assert min(by_hand) < 0  # responses long enough to be penalised
    torch.testing.assert_close((rollout["rewards"] - rollout["scores"]).tolist(), by_hand)
    assert stats.compute()["rollout/overlong_penalty"] == pytest.approx(sum(by_hand) / len(by_hand))
    with pytest.raises(ValueError, match="overlong_buffer_length"):
        grpo(overlong_buffer_length=7, generation=GenerationConfig(max_new_tokens=6))


def test_grpo_with_dynamic_sampling_raises_reward(repo_path: Any) -> None:
    pl.seed_everything(0)
    # G = 4, 3 new tokens: some groups have no "e" at all (all rewards 0) and are refilled from the next batch
    module = grpo(generation=GenerationConfig(max_new_tokens=3), max_generation_rounds=3)
    rec = StepRecorder()
    trainer = fit(module, datamodule(repo_path, batch_size=8), 10, rec)
    assert trainer.global_step == 10 and len(rec.rows) == 10
    scores = rec.series("rollout/score")
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.1 and last > 1.8 * first, scores
    drops = rec.series("rollout/dynamic_sampling/drop_fraction")
    assert max(drops) > 0, drops
    rounds = rec.series("rollout/dynamic_sampling/rounds")
    assert all(1 <= r <= 3 for r in rounds) and max(rounds) >= 2, rounds
    # trained groups are never degenerate unless the cap filled them in
    for row in rec.rows:
        if row["rollout/dynamic_sampling/capped"] == 0:
            assert row["rollout/dynamic_sampling/filler_fraction"] == 0


def test_round_cap_trains_on_what_was_collected(repo_path: Any) -> None:
    """A reward equal for every response: every group is dropped, each update stops at the cap."""
    pl.seed_everything(0)
    module = grpo(reward_functions=NEVER, beta=0.1, max_generation_rounds=2, num_generations=2)
    rec = StepRecorder()
    trainer = fit(module, datamodule(repo_path, batch_size=4, size=16), 2, rec)
    assert trainer.global_step == 2 and module._rollout_index == 4  # 2 rounds per update
    for row in rec.rows:
        assert row["rollout/dynamic_sampling/drop_fraction"] == 1.0
        assert row["rollout/dynamic_sampling/rounds"] == 2.0
        assert row["rollout/dynamic_sampling/capped"] == 1.0
        assert row["rollout/dynamic_sampling/filler_fraction"] == 1.0
    assert rec.rows[-1]["train/loss"] == pytest.approx(0.0, abs=1e-7)  # zero advantage, policy == reference
    with pytest.raises(ValueError, match="dynamic_sampling_groups=5 exceeds"):
        fit(grpo(dynamic_sampling_groups=5), datamodule(repo_path, batch_size=4, size=8), 1)


class SaveBetweenRounds(pl.Callback):
    """Saves one checkpoint after the first round that leaves a step partly collected (kept groups waiting)."""

    def __init__(self, path: Path, after_step: int) -> None:
        self.path, self.after_step = path, after_step
        self.saved_at: tuple[int, int] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, module: GRPOModule, *args: Any) -> None:
        buffer = module.dynamic_sampling_buffer()
        if self.saved_at is None and trainer.global_step >= self.after_step and buffer.kept:
            trainer.save_checkpoint(self.path)
            self.saved_at = (trainer.global_step, buffer.rounds)


def test_resume_between_rounds_continues_the_same_run(repo_path: Any, tmp_path: Path) -> None:
    """Checkpoint in the middle of a step (kept groups buffered, more rounds to go), resume: the remaining
    updates log exactly the numbers of the uninterrupted run (buffer, round counters, step statistics,
    sampling seeds, loader position and optimizer state all come back)."""

    def make() -> GRPOModule:
        pl.seed_everything(0)
        return grpo(
            num_generations=2,
            beta=0.05,
            num_mini_batches=2,
            gradient_accumulation_steps=2,
            dynamic_sampling_groups=4,
            max_generation_rounds=4,
            overlong_buffer_length=1,
            generation=GenerationConfig(max_new_tokens=2),
            optim=OptimConfig(lr=1e-2, warmup_steps=1, scheduler="cosine"),
        )

    steps = 5
    straight, saver = StepRecorder(), SaveBetweenRounds(tmp_path / "mid.ckpt", after_step=1)
    fit(make(), datamodule(repo_path, batch_size=4, size=40), steps, straight, saver)
    assert saver.saved_at is not None, "no round left a step partly collected"
    step, rounds = saver.saved_at
    assert rounds >= 1 and step < steps

    module = make()
    resumed = StepRecorder()
    fit(module, datamodule(repo_path, batch_size=4, size=40), steps, resumed, ckpt_path=str(saver.path))
    assert len(resumed.rows) == steps - step
    for before, after in zip(straight.rows[step:], resumed.rows):
        keys = [k for k in before if k in after]
        assert "rollout/dynamic_sampling/rounds" in keys and len(keys) > 10
        for key in keys:
            assert after[key] == before[key], key
    assert max(straight.series("rollout/dynamic_sampling/rounds")[step:]) >= 2
