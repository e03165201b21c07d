"""PPO, GRPO and Safe-RLHF on the tiny random Qwen2 with rule-based rewards.

What is shown: the policy learns (the mean reward rises), the numbers fed to the losses are right (log-probs
and reward-model scores of padded rollouts equal those of unpadded single sequences; gradient accumulation
over minibatches equals one full batch, also under ZeRO-3), the Lagrange multiplier moves the right way,
ZeRO-3 gathers the actor once per rollout, and a resumed run continues exactly where the interrupted one was.
The reward used for learning is the share of the letter "e" in the response (``target_token_share``): dense
enough for a random 2048-token policy to pick up within ~10 rollouts of 8 new tokens.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from launch_env import DIST_ENV
from lightning.pytorch.callbacks import ModelCheckpoint

from aa_lightning.algorithms import GenerationConfig, GRPOModule, OptimConfig, PPOModule, SafeRLHFModule
from aa_lightning.algorithms.rl.metrics import MetricAccumulator, RunningMoments, samples_markdown
from aa_lightning.algorithms.rl.rollout import response_mask_from_eos
from aa_lightning.data import TextToTextDataModule
from aa_lightning.rewards import RewardSpec

E_SHARE = [RewardSpec("target_token_share", kwargs={"target": "e"})]
# set by DeepSpeed / Lightning for launched ranks; must not leak into later tests or child runs


class Recorder(pl.Callback):
    """The logged metrics after every training batch (one rollout)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    def series(self, key: str) -> list[float]:
        return [row[key] for row in self.rows]


def datamodule(repo_path: Any, batch_size: int, size: int = 200, **kwargs: Any) -> TextToTextDataModule:
    return TextToTextDataModule(
        model_name_or_path="tiny-qwen2",
        train={"path": repo_path("configs/data/alpaca_200.json"), "template": "Alpaca", "size": size},
        max_length=64,
        batch_size=batch_size,
        **kwargs,
    )


def fit(
    module: pl.LightningModule,
    dm: pl.LightningDataModule,
    rollouts: int,
    *callbacks: pl.Callback,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        max_steps=rollouts * module.updates_per_rollout(),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=list(callbacks), **defaults)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


def ppo(**kwargs: Any) -> PPOModule:
    args: dict[str, Any] = dict(
        model_name_or_path="tiny-qwen2",
        reward_functions=E_SHARE,
        generation=GenerationConfig(max_new_tokens=8),
        optim=OptimConfig(lr=3e-2, warmup_steps=0, scheduler="constant"),
        critic_lr=1e-2,
        kl_coef=0.0,
        sample_log_interval=0,
    )
    args.update(kwargs)
    return PPOModule(**args)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def test_response_mask_keeps_first_eos_and_masks_the_rest() -> None:
    eos, pad = 2, 3
    ids = torch.tensor(
        [[5, 6, eos, pad, pad], [5, eos, 7, eos, pad], [5, 6, 7, 8, 9], [eos, pad, pad, pad, pad]]
    )
    mask, has_eos = response_mask_from_eos(ids, [eos])
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, True, False, False, False],
        [True, True, True, True, True],
        [True, False, False, False, False],
    ]
    assert has_eos.tolist() == [True, True, False, True]
    # pad == eos (many tokenizers): the padding after the first EOS is masked too
    mask, _ = response_mask_from_eos(torch.tensor([[5, eos, eos, eos]]), [eos])
    assert mask.tolist() == [[True, True, False, False]]


def test_running_moments_and_metric_accumulator_match_torch() -> None:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=g) * 3 + 1 for n in (5, 1, 17)]
    moments = RunningMoments()
    for b in batches:
        moments.update(b)
    everything = torch.cat(batches).double()
    torch.testing.assert_close(moments.mean, everything.mean())
    torch.testing.assert_close(moments.std, everything.std())
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    torch.testing.assert_close(
        restored.normalize(everything),
        (everything - everything.mean()) / everything.std(),
        rtol=1e-6,
        atol=1e-6,
    )

    acc = MetricAccumulator()
    values, mask = torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g) > 0.4
    acc.add_mean("tok", values[:2], mask[:2])
    acc.add_mean("tok", values[2:], mask[2:])
    for b in batches:
        acc.add_std("seq", b)
    out = acc.compute()
    torch.testing.assert_close(out["tok"], values[mask].mean())
    torch.testing.assert_close(out["seq"], everything.mean().float())
    torch.testing.assert_close(out["seq_std"], everything.std().float())


def test_samples_markdown_escapes_cells() -> None:
    table = samples_markdown(["a|b"], ["line1\nline2"], {"score": [0.5]})
    assert "a\\|b" in table and "line1<br>line2" in table and "| 0.5 |" in table


# --------------------------------------------------------------------------------------------------
# correctness of the rollout numbers
# --------------------------------------------------------------------------------------------------


def test_rollout_logprobs_and_scores_match_unpadded_forwards(repo_path: Any) -> None:
    """Left-padded prompts + right-padded responses give the same log-probs / end scores as one sequence alone."""
    pl.seed_everything(0)
    module = ppo(
        reward_model_name_or_path="tiny-qwen2-score",
        reward_model_weight=1.0,
        generation=GenerationConfig(max_new_tokens=6),
    )
    module.configure_model()
    dm = datamodule(repo_path, batch_size=4, size=8, kind="prompt_only")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["attention_mask"][:, 0].min() == 0, "the test needs a left-padded batch"
    rollout = module.generate_rollout(batch)
    logprobs, _ = module.response_log_probs(module.model, rollout)
    scores, parts = module.compute_scores(rollout)
    torch.testing.assert_close(scores, parts["reward_model"] + parts["target_token_share"])
    for i in range(len(rollout)):
        keep = rollout.attention_mask[i].bool()
        seq = rollout.sequences[i][keep].unsqueeze(0)
        n_resp = int(rollout.response_mask[i].sum())
        with torch.no_grad():
            logits = module.model(input_ids=seq).logits[0, -n_resp - 1 : -1]
            alone = logits.log_softmax(-1).gather(-1, seq[0, -n_resp:, None]).squeeze(-1)
            end_score = module.reward_model(input_ids=seq).end_scores[0]
        torch.testing.assert_close(logprobs[i, :n_resp], alone, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(parts["reward_model"][i], end_score, rtol=1e-4, atol=1e-4)
        assert rollout.responses[i] == module.tokenizer.decode(seq[0, -n_resp:], skip_special_tokens=True)


class FirstGradients(pl.Callback):
    """The gradients each optimizer is about to apply at its first step (after clipping, if any)."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any
    ) -> None:
        if len(self.grads) < len(trainer.optimizers):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self.grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]).clone())


def test_minibatch_accumulation_equals_one_batch_and_counts_actor_updates(repo_path: Any) -> None:
    """2 minibatches accumulated into one step == 1 full batch (token-weighted), for actor and critic."""

    def run(**kw: Any) -> tuple[pl.Trainer, Recorder, FirstGradients]:
        pl.seed_everything(0)
        module = ppo(kl_coef=0.05, kl_estimator="k3", max_grad_norm=None, **kw)
        rec, grads = Recorder(), FirstGradients()
        trainer = fit(module, datamodule(repo_path, batch_size=8, size=32), 2, rec, grads)
        return trainer, rec, grads

    t_full, r_full, g_full = run()
    t_accum, r_accum, g_accum = run(num_mini_batches=2, gradient_accumulation_steps=2)
    assert t_full.global_step == t_accum.global_step == 2  # one actor update per rollout in both
    assert len(g_full.grads) == len(g_accum.grads) == 2  # actor and critic optimizers
    for full, accum in zip(g_full.grads, g_accum.grads):
        assert full.abs().sum() > 0
        torch.testing.assert_close(accum, full, rtol=1e-4, atol=1e-7)
    for key in ("train/actor_grad_norm", "train/critic_grad_norm", "rollout/score", "rollout/kl"):
        assert r_full.series(key) == pytest.approx(r_accum.series(key), rel=1e-3, abs=1e-6), key

    # 2 epochs x 2 minibatches, no accumulation: 4 actor updates per rollout, and the critic steps too
    pl.seed_everything(0)
    module = ppo(ppo_epochs=2, num_mini_batches=2)
    module.configure_model()
    critic_before = {k: v.clone() for k, v in module.critic.state_dict().items()}
    trainer = fit(module, datamodule(repo_path, batch_size=8, size=32), 1)
    assert module.updates_per_rollout() == 4 and trainer.global_step == 4
    assert any(not torch.equal(v, module.critic.state_dict()[k]) for k, v in critic_before.items())


# --------------------------------------------------------------------------------------------------
# learning
# --------------------------------------------------------------------------------------------------


def test_ppo_raises_reward(repo_path: Any) -> None:
    pl.seed_everything(0)
    module = ppo()
    rec = Recorder()
    fit(module, datamodule(repo_path, batch_size=32), 10, rec)
    scores = rec.series("rollout/score")
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.08 and last > 1.6 * first, scores
    for key in (
        "rollout/kl",
        "rollout/entropy",
        "train/value_loss",
        "train/policy_clip_fraction",
        "train/explained_variance",
        "rollout/response_length",
        "rollout/reward_std",
        "train/lr_critic",
    ):
        assert key in rec.rows[-1] and math.isfinite(rec.rows[-1][key]), key
    assert module.ref_model is not None and not any(p.requires_grad for p in module.ref_model.parameters())


def test_grpo_raises_reward_without_reference_when_beta_is_zero(repo_path: Any) -> None:
    pl.seed_everything(0)
    module = GRPOModule(
        model_name_or_path="tiny-qwen2",
        reward_functions=E_SHARE,
        num_generations=4,
        beta=0.0,
        generation=GenerationConfig(max_new_tokens=4),
        sample_log_interval=0,
        optim=OptimConfig(lr=3e-2, warmup_steps=0, scheduler="constant"),
    )
    rec = Recorder()
    fit(module, datamodule(repo_path, batch_size=8), 10, rec)
    assert module.ref_model is None  # beta == 0: no reference model is ever loaded
    scores = rec.series("rollout/score")
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.1 and last > 1.8 * first, scores
    assert rec.rows[-1]["train/kl"] == 0.0


def test_grpo_iterations_use_old_logprobs(repo_path: Any) -> None:
    """num_iterations > 1: later passes are off-policy (ratio != 1, clipping engages), KL uses a reference."""
    pl.seed_everything(0)
    module = GRPOModule(
        model_name_or_path="tiny-qwen2",
        reward_functions=E_SHARE,
        num_generations=2,
        beta=0.1,
        num_iterations=3,
        scale="none",
        loss_aggregation="constant",
        generation=GenerationConfig(max_new_tokens=4),
        sample_log_interval=0,
        optim=OptimConfig(lr=5e-2, warmup_steps=0, scheduler="constant"),
    )
    rec = Recorder()
    trainer = fit(module, datamodule(repo_path, batch_size=8, size=16), 2, rec)
    assert trainer.global_step == 6 and module.ref_model is not None
    assert rec.rows[-1]["train/clip_fraction"] > 0 and rec.rows[-1]["train/kl"] > 0


# --------------------------------------------------------------------------------------------------
# Safe-RLHF
# --------------------------------------------------------------------------------------------------


def test_lagrange_multiplier_rises_above_and_falls_below_the_cost_limit() -> None:
    module = SafeRLHFModule(
        model_name_or_path="tiny-qwen2",
        reward_functions=E_SHARE,
        cost_functions=[RewardSpec("response_length")],
        cost_limit=0.5,
        lambda_init=1.0,
        lambda_lr=0.1,
    )
    lambdas = [float(module.lagrange_multiplier)]
    for cost in (1.5, 1.2, 0.9):  # above the limit
        lambdas.append(float(module.update_lagrange_multiplier(torch.tensor(cost))))
    for cost in (0.2, 0.0, -1.0):  # below it
        lambdas.append(float(module.update_lagrange_multiplier(cost)))
    assert lambdas[0] < lambdas[1] < lambdas[2] < lambdas[3]
    assert lambdas[3] > lambdas[4] > lambdas[5] > lambdas[6]
    # one step is gradient descent on -lambda * (J - d): log_lambda += lr * lambda * (J - d)
    expected = math.log(lambdas[3]) + 0.1 * lambdas[3] * (0.2 - 0.5)
    assert math.log(lambdas[4]) == pytest.approx(expected, rel=1e-9)

    capped = SafeRLHFModule(
        model_name_or_path="tiny-qwen2",
        reward_functions=E_SHARE,
        cost_functions=[RewardSpec("response_length")],
        lambda_max=1.5,
        lambda_lr=10.0,
    )
    assert float(capped.update_lagrange_multiplier(100.0)) == pytest.approx(1.5)


def test_safe_rlhf_trains_and_lambda_tracks_the_cost(repo_path: Any) -> None:
    pl.seed_everything(0)
    module = SafeRLHFModule(
        model_name_or_path="tiny-qwen2",
        reward_functions=E_SHARE,
        cost_functions=[RewardSpec("response_length", kwargs={"scale": 10.0})],  # ~3 per response
        cost_limit=0.5,
        lambda_lr=0.05,
        generation=GenerationConfig(max_new_tokens=6),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, scheduler="constant"),
        sample_log_interval=0,
    )
    rec = Recorder()
    fit(module, datamodule(repo_path, batch_size=8, size=32), 3, rec)
    lambdas = rec.series("train/lambda")
    assert lambdas[0] > 1.0 and lambdas[0] < lambdas[1] < lambdas[2]  # cost stays far above the limit
    assert lambdas[-1] == pytest.approx(float(module.lagrange_multiplier), rel=1e-6)
    assert min(rec.series("rollout/cost")) > 0.5
    for key in ("train/cost_value_loss", "train/cost_explained_variance", "rollout/episode_cost"):
        assert math.isfinite(rec.rows[-1][key]), key


# --------------------------------------------------------------------------------------------------
# checkpoint / resume
# --------------------------------------------------------------------------------------------------


def test_resume_mid_run_continues_the_same_run(repo_path: Any, tmp_path: Path) -> None:
    """Checkpoint after N rollouts of an N+M run, resume: the last M rollouts log exactly the same numbers.

    Safe-RLHF covers every piece of state: actor, critic and cost-critic optimizers, the schedule, lambda,
    running score statistics, sampling seeds and the prompt loader position (minibatches are shuffled).
    """

    def make() -> tuple[SafeRLHFModule, TextToTextDataModule]:
        pl.seed_everything(0)
        module = SafeRLHFModule(
            model_name_or_path="tiny-qwen2",
            reward_functions=E_SHARE,
            cost_functions=[RewardSpec("response_length", kwargs={"scale": 30.0})],
            cost_limit=0.5,
            normalize_score=True,
            ppo_epochs=2,
            num_mini_batches=2,
            critic_lr=5e-3,
            generation=GenerationConfig(max_new_tokens=6),
            sample_log_interval=0,
            optim=OptimConfig(lr=1e-2, warmup_steps=1, scheduler="cosine"),
        )
        return module, datamodule(repo_path, batch_size=4, size=40)

    module, dm = make()
    steps_per_rollout = module.updates_per_rollout()
    straight = Recorder()
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=2 * steps_per_rollout, save_top_k=-1, filename="{step}"
    )
    fit(module, dm, 4, straight, checkpoint, enable_checkpointing=True)
    ckpt = tmp_path / f"step={2 * steps_per_rollout}.ckpt"
    assert ckpt.exists()

    module, dm = make()
    resumed = Recorder()
    fit(module, dm, 4, resumed, ckpt_path=str(ckpt))
    assert len(resumed.rows) == 2
    for before, after in zip(straight.rows[2:], resumed.rows):
        keys = [k for k in before if k in after]
        assert len(keys) > 25
        for key in keys:
            assert after[key] == before[key], key
    assert float(module.lagrange_multiplier) != 1.0


# --------------------------------------------------------------------------------------------------
# ptx and ZeRO-3
# --------------------------------------------------------------------------------------------------


def test_ptx_loss_from_a_dict_of_loaders(repo_path: Any) -> None:
    pl.seed_everything(0)
    prompts = datamodule(repo_path, batch_size=4, size=8, kind="prompt_only")
    supervised = datamodule(repo_path, batch_size=4, size=8, kind="supervised")
    prompts.setup("fit")
    supervised.setup("fit")
    module = ppo(ptx_coef=0.5)
    rec = Recorder()
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[rec],
    )
    trainer.fit(
        module, train_dataloaders={"prompt": prompts.train_dataloader(), "ptx": supervised.train_dataloader()}
    )
    assert 0 < rec.rows[-1]["train/ptx_loss"] < 20


@pytest.fixture
def restore_env() -> Iterator[None]:
    """DeepSpeed exports RANK/WORLD_SIZE/...; later tests must not mistake themselves for launched ranks."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_ppo_zero3_gathers_actor_once_per_rollout(
    repo_path: Any, monkeypatch: pytest.MonkeyPatch, restore_env: None
) -> None:
    """ZeRO-3 (single process, every tensor sharded): generate runs on gathered weights with the per-layer
    fetch hooks lifted, and gradient accumulation across minibatches matches the unsharded run."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    from aa_lightning.strategies import CPUDeepSpeedStrategy, zero_config

    fetches = {"n": 0}
    original_fetch = PartitionedParameterCoordinator.fetch_sub_module

    def counting_fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        fetches["n"] += 1
        return original_fetch(self, *args, **kwargs)

    monkeypatch.setattr(PartitionedParameterCoordinator, "fetch_sub_module", counting_fetch)
    gathers = {"n": 0}
    original_gathered = deepspeed.zero.GatheredParameters

    def counting_gathered(*args: Any, **kwargs: Any) -> Any:
        gathers["n"] += 1
        return original_gathered(*args, **kwargs)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", counting_gathered)

    class Probe(pl.Callback):
        def __init__(self) -> None:
            self.generations: list[dict[str, int]] = []

        def on_train_start(self, trainer: pl.Trainer, module: PPOModule) -> None:
            generate, actor = module.model.generate, module.model

            def probed(*args: Any, **kwargs: Any) -> Any:
                stats = {
                    "forwards": 0,
                    "not_gathered": 0,
                    "fetch_before": fetches["n"],
                    "gathers": gathers["n"],
                }

                def hook(*_: Any) -> None:
                    stats["forwards"] += 1
                    stats["not_gathered"] += sum(
                        p.ds_status != ZeroParamStatus.AVAILABLE for p in actor.parameters()
                    )

                handle = actor.register_forward_pre_hook(hook)
                try:
                    return generate(*args, **kwargs)
                finally:
                    handle.remove()
                    stats["fetches"] = fetches["n"] - stats.pop("fetch_before")
                    self.generations.append(stats)

            module.model.generate = probed

    pl.seed_everything(0)
    reference = Recorder()
    fit(
        ppo(num_mini_batches=2, gradient_accumulation_steps=2, max_grad_norm=None),
        datamodule(repo_path, batch_size=8, size=16),
        1,
        reference,
    )

    config = zero_config(stage=3)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # shard even the tiny tensors
    pl.seed_everything(0)
    module = ppo(num_mini_batches=2, gradient_accumulation_steps=2, max_grad_norm=None)
    probe, rec = Probe(), Recorder()
    fit(
        module,
        datamodule(repo_path, batch_size=8, size=16),
        2,
        probe,
        rec,
        strategy=CPUDeepSpeedStrategy(config=config),
    )
    weight = module.model.model.layers[0].mlp.up_proj.weight
    assert weight.ds_numel > 0 and weight.numel() == 0  # really sharded outside generation
    assert len(probe.generations) == 2
    for gen in probe.generations:
        assert gen["forwards"] > 2  # several decoding steps ...
        assert gen["fetches"] == 0  # ... none of which fetched a shard
        assert gen["not_gathered"] == 0  # every actor tensor was whole at every step
    assert probe.generations[1]["gathers"] - probe.generations[0]["gathers"] == 1  # one gather per rollout
    # one ZeRO-3 optimizer (actor + critic groups), accumulation over 2 minibatches: same first-step gradient
    expected = math.hypot(
        reference.rows[0]["train/actor_grad_norm"], reference.rows[0]["train/critic_grad_norm"]
    )
    assert rec.rows[0]["train/grad_norm"] == pytest.approx(expected, rel=1e-4)
    assert rec.rows[0]["rollout/score"] == pytest.approx(reference.rows[0]["rollout/score"], rel=1e-6)
    assert "train/lr_critic" in rec.rows[-1]


_TWO_RANKS = """
import json, sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from aa_lightning.algorithms import GenerationConfig, OptimConfig, SafeRLHFModule
from aa_lightning.data import TextToTextDataModule
from aa_lightning.rewards import RewardSpec
from aa_lightning.strategies import CPUDeepSpeedStrategy, zero_config

torch.set_num_threads(1)
out = Path({out!r})
pl.seed_everything(0)
module = SafeRLHFModule(
    model_name_or_path="tiny-qwen2", reward_functions=[RewardSpec("target_token_share", kwargs={{"target": "e"}})],
    cost_functions=[RewardSpec("response_length", kwargs={{"scale": 30.0}})], cost_limit=0.5,
    normalize_score=True, generation=GenerationConfig(max_new_tokens=6), sample_log_interval=0,
    optim=OptimConfig(lr=1e-2, warmup_steps=0, scheduler="constant"),
)
data = TextToTextDataModule(
    model_name_or_path="tiny-qwen2", batch_size=4, max_length=64,
    train={{"path": {data!r}, "template": "Alpaca", "size": 32}},
)
calls = []


class Probe(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        generate = pl_module.model.generate

        def recorded(*args, **kwargs):
            output = generate(*args, **kwargs)
            calls.append({{"synced_gpus": kwargs.get("synced_gpus", False), "length": output.shape[1]}})
            return output

        pl_module.model.generate = recorded


rows = []


class Rows(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        rows.append({{k: float(v) for k, v in trainer.callback_metrics.items()}})


config = zero_config(stage=3)
config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
trainer = pl.Trainer(
    max_steps=2, accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy(config=config), logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Probe(), Rows()],
)
trainer.fit(module, data)
result = dict(rank=trainer.global_rank, calls=calls, rows=rows, global_step=trainer.global_step,
              lam=float(module.lagrange_multiplier))
(out / f"rank{{trainer.global_rank}}.json").write_text(json.dumps(result))
"""


def test_safe_rlhf_zero3_two_processes(repo_path: Any, tmp_path: Path) -> None:
    """Two ranks under ZeRO-3: generate runs with synced_gpus, metrics and lambda are global (identical)."""
    script = tmp_path / "two_ranks.py"
    script.write_text(
        textwrap.dedent(_TWO_RANKS).format(out=str(tmp_path), data=repo_path("configs/data/alpaca_200.json"))
    )
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_path(), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"2-process ZeRO-3 Safe-RLHF run hung:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["global_step"] == 2 and len(rank["calls"]) == 2
        assert all(call["synced_gpus"] for call in rank["calls"])
    assert ranks[0]["rows"] == ranks[1]["rows"]  # every logged number is reduced over both ranks
    assert ranks[0]["lam"] == ranks[1]["lam"] > 1.0


def test_rollouts_sample_from_the_full_distribution_by_default(repo_path: Any) -> None:
    """top_k=0 / top_p=1 must reach generate: left as None, transformers would truncate to its top-k 50."""
    from unittest import mock

    module = GRPOModule(
        model_name_or_path="tiny-qwen2",
        reward_functions=E_SHARE,
        num_generations=2,
        beta=0.0,
        generation=GenerationConfig(max_new_tokens=3),
        sample_log_interval=0,
    )
    real_topk, calls = torch.topk, []

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_topk(*args, **kwargs)

    with mock.patch("torch.topk", spy):
        fit(module, datamodule(repo_path, batch_size=2, size=4), 1, Recorder())
    assert calls == []
