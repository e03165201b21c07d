"""Online DPO (arXiv:2402.04792) and best-of-n / RAFT (arXiv:2304.06767) on the tiny random Qwen2.

Shown on real rollouts of the small task of ``test_rl_modules.py`` (reward: the share of the letter "e"):
each pair is ordered (chosen, rejected) by score, the loss is exactly ``dpo_loss`` of the pair's log-probs,
both modules raise the reward within a fixed number of rollouts, and a resumed Online DPO run logs exactly
what the uninterrupted one did.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_rl_modules import E_SHARE, Recorder, datamodule, fit

from aa_lightning.algorithms import BestOfNModule, GenerationConfig, OnlineDPOModule, OptimConfig
from aa_lightning.algorithms.dpo import DPOLossType
from aa_lightning.algorithms.losses import dpo_loss
from aa_lightning.algorithms.losses.pairwise import DPO_LOSS_TYPES
from aa_lightning.algorithms.rl.best_of_n import top_k_per_group
from aa_lightning.algorithms.rl.online_dpo import pair_indices


def online_dpo(**kwargs: Any) -> OnlineDPOModule:
    args: dict[str, Any] = dict(
        model_name_or_path="tiny-qwen2",
        reward_functions=E_SHARE,
        generation=GenerationConfig(max_new_tokens=4),
        sample_log_interval=0,
        optim=OptimConfig(lr=5e-2, warmup_steps=0, scheduler="constant"),
    )
    args.update(kwargs)
    return OnlineDPOModule(**args)


def test_pair_and_top_k_rules_by_hand() -> None:
    scores = torch.tensor([0.1, 0.3, 0.5, 0.2, 0.4, 0.4])
    chosen, rejected, tie = pair_indices(scores)
    assert (
        chosen.tolist() == [1, 2, 4]
        and rejected.tolist() == [0, 3, 5]
        and tie.tolist() == [False, False, True]
    )
    assert pair_indices(scores, tie_tolerance=0.25)[2].tolist() == [True, False, True]
    # groups of 3: [0.1, 0.3, 0.5] -> rows 2, 1; [0.2, 0.4, 0.4] -> rows 4, 5 (tie: the earlier first)
    assert top_k_per_group(scores, 3, 2).tolist() == [2, 1, 4, 5]


def test_loss_types_follow_dpo_module_and_loss_is_dpo_loss() -> None:
    from typing import get_args

    assert set(get_args(DPOLossType)) == set(DPO_LOSS_TYPES)  # every DPOModule pair loss, selectable here too
    with pytest.raises(ValueError, match="unknown loss_type"):
        online_dpo(loss_type="no_such_loss")
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    rc, rr = torch.tensor([-3.5, -4.5]), torch.tensor([-3.5, -4.5])
    # sigmoid, beta 0.5: h = (pc - rc) - (pr - rr) = [0.5 + 0.5, -0.5 - 0.5] = [1, -1]
    # loss = mean(-log sigma(0.5), -log sigma(-0.5)) = mean(0.474077, 0.974077) = 0.724077
    out = online_dpo(beta=0.5).pair_loss(pc, pr, rc, rr)
    assert float(out.loss) == pytest.approx(0.5 * (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.5))))
    assert float(out.loss) == pytest.approx(0.724077, abs=1e-6)
    for loss_type in DPO_LOSS_TYPES:
        module = online_dpo(beta=0.5, loss_type=loss_type)
        got, want = module.pair_loss(pc, pr, rc, rr), dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type)
        torch.testing.assert_close(got.losses, want.losses)
    # ipo: (h - 1 / (2 beta))^2 = (1 - 1)^2, (-1 - 1)^2 -> [0, 4]; and IPO compares per-token means
    ipo = online_dpo(beta=0.5, loss_type="ipo")
    assert ipo.pair_loss(pc, pr, rc, rr).losses.tolist() == [0.0, 4.0] and ipo.uses_mean_log_probs
    assert not online_dpo().uses_mean_log_probs


def test_pairs_of_a_real_rollout_put_the_higher_score_first(repo_path: Any) -> None:
    pl.seed_everything(0)
    module = online_dpo()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=1, enable_progress_bar=False)
    dm = datamodule(repo_path, batch_size=8, kind="prompt_only")
    module.configure_model()
    dm.setup("fit")
    trainer.strategy.connect(module)
    batch = next(iter(dm.train_dataloader()))
    rollout, _ = module.experience(batch)
    assert len(rollout) == 16
    pairs = rollout["scores"].view(-1, 2)
    assert bool((pairs[:, 0] >= pairs[:, 1]).all())
    tie = (pairs[:, 0] == pairs[:, 1]).float()
    assert rollout["pair_weight"].view(-1, 2)[:, 0].tolist() == (1 - tie).tolist()
    assert (pairs[:, 0] > pairs[:, 1]).any()  # real preferences, not all ties
    # the stored scores are the reward functions' scores of the stored responses, and a pair shares its prompt
    rescored, _ = module.compute_scores(rollout)
    torch.testing.assert_close(rescored, rollout["scores"])
    assert rollout.prompts[0::2] == rollout.prompts[1::2]
    assert module.ref_model is not None


def test_online_dpo_raises_reward(repo_path: Any) -> None:
    pl.seed_everything(0)
    module = online_dpo()
    rec = Recorder()
    fit(module, datamodule(repo_path, batch_size=8), 12, rec)
    scores = rec.series("rollout/score")
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.1 and last > 2 * first, scores
    row = rec.rows[-1]
    assert row["rollout/chosen_score"] > row["rollout/rejected_score"]
    for key in ("train/loss", "train/rewards/margins", "train/rewards/accuracies", "train/logps/chosen"):
        assert math.isfinite(row[key]), key


def test_best_of_n_raises_reward(repo_path: Any) -> None:
    pl.seed_everything(0)
    module = BestOfNModule(
        model_name_or_path="tiny-qwen2",
        reward_functions=E_SHARE,
        num_generations=4,
        top_k=1,
        generation=GenerationConfig(max_new_tokens=4),
        sample_log_interval=0,
        optim=OptimConfig(lr=3e-2, warmup_steps=0, scheduler="constant"),
    )
    rec = Recorder()
    fit(module, datamodule(repo_path, batch_size=8), 10, rec)
    assert module.ref_model is None  # supervised steps: no reference
    scores = rec.series("rollout/score")
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.1 and last > 2 * first, scores
    kept = rec.series("rollout/kept_score")
    assert all(k >= s for k, s in zip(kept, scores))  # the best of each prompt is at least its mean


def test_online_dpo_resume_continues_the_same_run(repo_path: Any, tmp_path: Path) -> None:
    """Checkpoint after 2 of 4 rollouts, resume: the last 2 rollouts log exactly the same numbers."""

    def make() -> tuple[OnlineDPOModule, Any]:
        pl.seed_everything(0)
        module = online_dpo(
            num_mini_batches=2,
            num_iterations=2,
            optim=OptimConfig(lr=1e-2, warmup_steps=1, scheduler="cosine"),
        )
        return module, datamodule(repo_path, batch_size=4, size=40)

    module, dm = make()
    steps = module.updates_per_rollout()
    straight = Recorder()
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=2 * steps, save_top_k=-1, filename="{step}"
    )
    fit(module, dm, 4, straight, checkpoint, enable_checkpointing=True)
    ckpt = tmp_path / f"step={2 * steps}.ckpt"
    assert ckpt.exists()
    module, dm = make()
    resumed = Recorder()
    fit(module, dm, 4, resumed, ckpt_path=str(ckpt))
    assert len(resumed.rows) == 2
    for before, after in zip(straight.rows[2:], resumed.rows):
        keys = [k for k in before if k in after]
        assert len(keys) > 12
        for key in keys:
            assert after[key] == before[key], key
