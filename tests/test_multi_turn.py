"""Multi-turn rollouts: the transcript layout, environment tokens as inputs only, GAE over policy tokens,
per-turn rewards, log-probs equal to unpadded forwards, GRPO/PPO on text and on Qwen2-VL, exact resume.

The environment here answers every policy turn with a fixed tool message and a per-turn reward, and cut turns
are answered too (``end_on_cut_turn=False``), so a random tiny policy produces episodes of exactly
``max_turns`` policy turns with environment tokens between them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from aa_lightning.algorithms import GenerationConfig, GRPOModule, OptimConfig, PPOModule
from aa_lightning.algorithms.losses import compute_gae, grpo_loss, ppo_policy_loss, ppo_value_loss
from aa_lightning.algorithms.rl.generation import ENGINE_LOGPROBS
from aa_lightning.algorithms.rl.metrics import MetricAccumulator
from aa_lightning.algorithms.rl.multi_turn import TURN_REWARDS, ObservationRenderer, turns_markdown
from aa_lightning.algorithms.rl.rollout_engines import (
    EngineCompletions,
    EngineRequest,
    register_rollout_engine,
)
from aa_lightning.algorithms.rl.rollout_engines.hf import HFGenerateEngine
from aa_lightning.data import TextImageToTextDataModule, TextToTextDataModule
from aa_lightning.environments import CONVERSATION, Environment, EnvironmentStep, register_environment
from aa_lightning.models.unwrap import unwrap
from aa_lightning.testing.tiny_common import build_tiny_tokenizer

E_SHARE = [{"name": "target_token_share", "kwargs": {"target": "e"}}]
TURN_REWARD = 0.25


@register_environment("test_fixed_tool")
class FixedTool(Environment):
    """Answers every turn with the tool result ``42`` and rewards each turn with ``TURN_REWARD``."""

    def step(self, conversation: list[dict], meta: dict) -> EnvironmentStep:
        assert conversation[-1]["role"] == "assistant"
        return EnvironmentStep([{"role": "tool", "content": "42"}], reward=TURN_REWARD)


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def text_data(repo_path: Any, batch_size: int = 2, size: int = 8) -> TextToTextDataModule:
    return TextToTextDataModule(
        model_name_or_path="tiny-qwen2",
        train={"path": repo_path("configs/data/alpaca_200.json"), "template": "Alpaca", "size": size},
        max_length=64,
        batch_size=batch_size,
        shuffle=False,
    )


def rl_kwargs(**kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        reward_functions=E_SHARE,
        generation=GenerationConfig(max_new_tokens=4),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, scheduler="constant"),
        environment="test_fixed_tool",
        max_turns=3,
        end_on_cut_turn=False,
        sample_log_interval=0,
        rollout_seed=0,
    )
    args.update(kwargs)
    return args


def fit(
    module: pl.LightningModule, dm: pl.LightningDataModule, rollouts: int, *callbacks: Any, **kw: Any
) -> pl.Trainer:
    ckpt_path = kw.pop("ckpt_path", None)
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
    defaults.update(kw)
    trainer = pl.Trainer(callbacks=list(callbacks), **defaults)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


def first_batch(dm: pl.LightningDataModule) -> dict[str, Any]:
    dm.hparams.kind = "prompt_only"  # no Trainer attaches the module that would say so
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def environment_mask(rollout: Any) -> torch.Tensor:
    """Response positions holding environment tokens (real, not the policy's)."""
    return rollout.attention_mask[:, rollout.prompt_length :].bool() & ~rollout.response_mask


# --------------------------------------------------------------------------------------------------
# pure pieces
# --------------------------------------------------------------------------------------------------


def test_observation_tokens_follow_the_chat_template() -> None:
    """After ``...<|im_end|>`` the tool message and the next generation prompt, exactly as ChatML renders them."""
    tokenizer = build_tiny_tokenizer()
    renderer = ObservationRenderer(tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    assert renderer.text([{"role": "tool", "content": "42"}], "<|im_end|>") == text
    assert tokenizer.decode(renderer.ids([{"role": "tool", "content": "42"}], end)) == text
    # a cut turn (no end token generated) is closed by the template's own end-of-turn text
    assert renderer.text([{"role": "user", "content": "go on"}], "").startswith(
        "<|im_end|>\n<|im_start|>user\n"
    )


def test_gae_steps_over_environment_tokens() -> None:
    """Hand-computed: rewards [1, ., ., 2], values [0.5, ., ., 0.25], gamma 0.9, lam 0.8, positions 1-2 masked.

    Over the policy tokens only: A_3 = 2 - 0.25 = 1.75; A_0 = 1 + 0.9 * 0.25 - 0.5 + 0.9 * 0.8 * 1.75 = 1.985.
    """
    rewards = torch.tensor([[1.0, 7.0, -3.0, 2.0]])
    values = torch.tensor([[0.5, 9.0, 9.0, 0.25]])
    mask = torch.tensor([[True, False, False, True]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, torch.tensor([[1.985, 0.0, 0.0, 1.75]]))
    torch.testing.assert_close(returns, torch.tensor([[2.485, 0.0, 0.0, 2.0]]))
    # the same as GAE of the compacted policy tokens; a contiguous mask is unchanged by the holes rule
    compact_adv, compact_ret = compute_gae(rewards[:, [0, 3]], values[:, [0, 3]], mask[:, [0, 3]], 0.9, 0.8)
    torch.testing.assert_close(advantages[:, [0, 3]], compact_adv)
    torch.testing.assert_close(returns[:, [0, 3]], compact_ret)


def test_turns_markdown_lists_every_turn_with_its_role() -> None:
    metas = [{CONVERSATION: [{"role": "user", "content": "q|1"}, {"role": "assistant", "content": "a\nb"}]}]
    table = turns_markdown(metas)
    assert "| 0 | 0 | user | q\\|1 |" in table and "| 0 | 1 | assistant | a<br>b |" in table


# --------------------------------------------------------------------------------------------------
# the rollout
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpo_rollout(tmp_path_factory: Any) -> tuple[GRPOModule, Any]:
    repo = Path(__file__).resolve().parents[1]
    pl.seed_everything(0)
    module = GRPOModule("tiny-qwen2", num_generations=2, beta=0.04, **rl_kwargs())
    module.configure_model()
    batch = first_batch(text_data(lambda p: str(repo / p)))
    assert batch["attention_mask"][:, 0].min() == 0, "the test needs a left-padded batch"
    return module, module.generate_rollout(batch, num_samples=2)


def test_rollout_layout_and_turn_rewards(grpo_rollout: tuple[GRPOModule, Any]) -> None:
    module, rollout = grpo_rollout
    tokenizer = module.tokenizer
    env = environment_mask(rollout)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i in range(len(rollout)):
        conversation = rollout.metas[i][CONVERSATION]
        assert [m["role"] for m in conversation] == [
            "prompt",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant",
        ]
        assert rollout.responses[i] == conversation[-1]["content"]
        # 3 policy turns of 4 tokens; the environment's tokens between them are real but not the policy's
        assert int(rollout.response_mask[i].sum()) == 12
        real = rollout.attention_mask[i].bool()
        transcript = tokenizer.decode(rollout.sequences[i][real])
        assert transcript.count("<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n") == 2
        env_text = tokenizer.decode(rollout.sequences[i, rollout.prompt_length :][env[i]])
        assert env_text.count("42") == 2 and "tool" in env_text
        assert (
            end in rollout.sequences[i, rollout.prompt_length :][env[i]].tolist()
        )  # cut turns closed by the env
        # a reward for each of the 3 turns, on the turn's last policy token
        positions = torch.nonzero(rollout[TURN_REWARDS][i]).flatten()
        assert positions.numel() == 3 and bool(rollout.response_mask[i, positions].all())
        assert not bool(rollout.response_mask[i, positions[:2] + 1].any())  # environment tokens follow
        torch.testing.assert_close(rollout[TURN_REWARDS][i].sum(), torch.tensor(3 * TURN_REWARD))


def test_multi_turn_logprobs_match_unpadded_transcripts(grpo_rollout: tuple[GRPOModule, Any]) -> None:
    """Left-padded prompts + right-padded transcripts: the policy tokens' log-probs equal one sequence alone."""
    module, rollout = grpo_rollout
    logprobs, _ = module.response_log_probs(module.model, rollout)
    for i in range(len(rollout)):
        keep = rollout.attention_mask[i].bool()
        seq = rollout.sequences[i][keep].unsqueeze(0)
        policy = rollout.response_mask[i][rollout.attention_mask[i, rollout.prompt_length :].bool()]
        n = policy.numel()
        with torch.no_grad():
            logits = module.model(input_ids=seq).logits[0, -n - 1 : -1]
        alone = logits.log_softmax(-1).gather(-1, seq[0, -n:, None]).squeeze(-1)
        torch.testing.assert_close(logprobs[i][rollout.response_mask[i]], alone[policy], rtol=1e-4, atol=1e-4)


def _logits_recorder(model: torch.nn.Module) -> tuple[list[torch.Tensor], Any]:
    """The LM head's outputs of every forward, their gradients kept."""
    return _logits_recorder_of(model.get_output_embeddings())


def _logits_recorder_of(layer: torch.nn.Module) -> tuple[list[torch.Tensor], Any]:
    kept: list[torch.Tensor] = []

    def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
        output.retain_grad()
        kept.append(output)

    return kept, layer.register_forward_hook(hook)


def test_environment_tokens_carry_no_gradient_grpo(grpo_rollout: tuple[GRPOModule, Any]) -> None:
    """GRPO's loss (clipped surrogate + k3 KL): the gradient w.r.t. the logits that predict environment tokens is
    exactly 0 (nonzero at policy tokens), and changing the environment positions' log-probs, old log-probs,
    reference log-probs or advantages does not change the loss."""
    module, rollout = grpo_rollout
    rollout["ref_logprobs"] = module.reference_response_log_probs(rollout)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    mask = rollout.response_mask
    env = environment_mask(rollout)
    kept, handle = _logits_recorder(module.model)
    try:
        module.model.zero_grad()
        logprobs, _ = module.response_log_probs(module.model, rollout)
        old = logprobs.detach() + 0.05 * torch.randn_like(
            logprobs
        )  # ratios != 1: the clipped branch runs too
        loss = grpo_loss(
            logprobs, old, rollout["ref_logprobs"], advantages, mask, clip_range=0.2, beta=0.04
        ).loss
        loss.backward()
    finally:
        handle.remove()
    r = rollout.response_length
    grad = kept[-1].grad[:, -(r + 1) : -1]  # the logits predicting each response token
    assert env.any() and bool((grad[env] == 0).all())
    assert bool((grad[mask].abs().sum(-1) > 0).all())

    def noisy(t: torch.Tensor) -> torch.Tensor:
        return torch.where(env, t + 3.0 * torch.randn_like(t), t)

    again = grpo_loss(
        noisy(logprobs.detach()), noisy(old), noisy(rollout["ref_logprobs"]), advantages, mask, 0.2, 0.04
    ).loss
    assert torch.equal(again, loss.detach())
    per_token = advantages[:, None].expand_as(logprobs)
    a = grpo_loss(logprobs.detach(), old, rollout["ref_logprobs"], per_token, mask, 0.2, 0.04).loss
    b = grpo_loss(logprobs.detach(), old, rollout["ref_logprobs"], noisy(per_token), mask, 0.2, 0.04).loss
    assert torch.equal(a, b)


def test_environment_tokens_carry_no_gradient_ppo(repo_path: Any) -> None:
    """PPO: advantages and returns are 0 at environment tokens, the actor's and the critic's gradients w.r.t.
    the outputs at those positions are exactly 0, and the losses ignore whatever sits there."""
    pl.seed_everything(0)
    module = PPOModule("tiny-qwen2", kl_coef=0.05, **rl_kwargs())
    module.configure_model()
    rollout = module.generate_rollout(first_batch(text_data(repo_path)))
    stats = MetricAccumulator()
    module.score_rollout(rollout, stats)
    module.forward_rollout(rollout, stats)
    module.compute_advantages(rollout, stats)
    env, mask = environment_mask(rollout), rollout.response_mask
    assert env.any()
    assert bool((rollout["advantages"][env] == 0).all()) and bool((rollout["returns"][env] == 0).all())
    assert bool((rollout["advantages"][mask] != 0).all())
    # the end score lands on the last policy token, the turn rewards on each turn's last one
    rewards, _ = module.token_rewards(
        module.shaped_score(rollout["scores"], rollout.has_eos, None, stats), rollout
    )
    for i in range(len(rollout)):
        last = int(torch.nonzero(mask[i]).max())
        assert bool((rewards[i][env[i]] == 0).all())
        kl_part = -module.kl_coef * (rollout["old_logprobs"][i, last] - rollout["ref_logprobs"][i, last])
        expected = rollout["scores"][i] + TURN_REWARD + kl_part
        torch.testing.assert_close(rewards[i, last], expected, rtol=1e-5, atol=1e-6)

    kept, handle = _logits_recorder(module.model)
    values_kept, value_handle = _logits_recorder_of(module.critic.score_head)
    try:
        loss = module.actor_loss(rollout, stats, torch.tensor(1.0), 1.0) + module.critic_loss(
            rollout, stats, torch.tensor(1.0)
        )
        loss.backward()
    finally:
        handle.remove()
        value_handle.remove()
    r = rollout.response_length
    assert bool((kept[-1].grad[:, -(r + 1) : -1][env] == 0).all())
    value_grad = values_kept[-1].grad[:, -(r + 1) : -1]
    assert bool((value_grad[env] == 0).all()) and bool((value_grad[mask] != 0).any())

    def noisy(t: torch.Tensor) -> torch.Tensor:
        return torch.where(env, t + 3.0 * torch.randn_like(t), t)

    logprobs = module.response_log_probs(module.model, rollout)[0].detach()
    base = ppo_policy_loss(logprobs, rollout["old_logprobs"], rollout["advantages"], mask, 0.2).loss
    moved = ppo_policy_loss(
        noisy(logprobs), noisy(rollout["old_logprobs"]), rollout["advantages"], mask, 0.2
    ).loss
    assert torch.equal(base, moved)
    values = module.value_forward(module.critic, rollout).detach()
    v_base = ppo_value_loss(values, rollout["old_values"], rollout["returns"], mask, 0.2).loss
    v_moved = ppo_value_loss(
        noisy(values), noisy(rollout["old_values"]), noisy(rollout["returns"]), mask, 0.2
    ).loss
    assert torch.equal(v_base, v_moved)


# --------------------------------------------------------------------------------------------------
# training: GRPO / PPO, text and Qwen2-VL, resume
# --------------------------------------------------------------------------------------------------


def test_grpo_and_ppo_train_on_multi_turn_rollouts(repo_path: Any, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    for cls, kwargs in ((GRPOModule, dict(num_generations=2)), (PPOModule, dict())):
        pl.seed_everything(0)
        module = cls("tiny-qwen2", **rl_kwargs(sample_log_interval=1, num_logged_samples=2), **kwargs)
        rec = Recorder()
        logger = TensorBoardLogger(str(tmp_path), name=cls.__name__)
        fit(module, text_data(repo_path), 2, rec, logger=logger)
        row = rec.rows[-1]
        assert row["rollout/policy_turns"] == 3.0 and row["rollout/environment_tokens"] > 0
        assert row["rollout/turn_reward"] == pytest.approx(3 * TURN_REWARD)
        assert all(math.isfinite(v) for v in row.values())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    turns = events.Tensors("rollout/turns/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| 0 | 1 | assistant |" in turns and "| 0 | 2 | tool | 42 |" in turns


def test_qwen2_vl_multi_turn_with_an_image_in_the_first_turn(repo_path: Any) -> None:
    """The image stays in the first turn; every later turn is generated from the whole transcript (M-RoPE
    positions from the model itself), and the per-token ``mm_token_type_ids`` are zero on the transcript."""
    dm = TextImageToTextDataModule(
        "tiny-qwen2-vl",
        train={
            "path": repo_path("configs/data/media/image/rlaif_v/detail_test_3_input.jsonl"),
            "template": "RLAIF-V",
        },
        max_length=256,
        batch_size=2,
        shuffle=False,
    )
    for cls, kwargs in ((GRPOModule, dict(num_generations=2)), (PPOModule, dict())):
        pl.seed_everything(0)
        module = cls("tiny-qwen2-vl", **rl_kwargs(max_turns=2), **kwargs)
        rec = Recorder()
        fit(module, dm, 1, rec)
        assert rec.rows[-1]["rollout/policy_turns"] == 2.0 and rec.rows[-1]["rollout/environment_tokens"] > 0
        assert all(math.isfinite(v) for v in rec.rows[-1].values())
    batch = first_batch(dm)
    rollout = module.generate_rollout(batch)
    assert "pixel_values" in rollout.extra_inputs
    types = rollout.extra_inputs["mm_token_type_ids"]
    assert types.shape == rollout.sequences.shape and not bool(types[:, rollout.prompt_length :].any())
    assert bool(environment_mask(rollout).any())


def test_multi_turn_resume_continues_the_same_run(repo_path: Any, tmp_path: Path) -> None:
    """Checkpoint after 2 of 4 rollouts, resume: the last 2 log exactly the same numbers (seeds of every turn,
    the environment's rewards, the optimizer and the loader position are all restored)."""

    def make() -> tuple[GRPOModule, TextToTextDataModule]:
        pl.seed_everything(0)
        module = GRPOModule(
            "tiny-qwen2",
            num_generations=2,
            num_mini_batches=2,
            num_iterations=2,
            **rl_kwargs(rollout_seed=None),
        )
        return module, text_data(repo_path, size=16)

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
        assert "rollout/environment_tokens" in keys and len(keys) > 15
        for key in keys:
            assert after[key] == before[key], key


@register_rollout_engine("test_multi_turn_reporting")
class ReportingEngine(HFGenerateEngine):
    """The default ``generate`` that also reports the log-probs of the tokens it sampled."""

    reports_logprobs = True

    def generate(self, module: Any, request: EngineRequest) -> EngineCompletions:
        kwargs = module.generation_kwargs(request.do_sample)
        length = request.inputs["input_ids"].shape[1]
        out = module.model.generate(
            **request.inputs, **kwargs, output_logits=True, return_dict_in_generate=True
        )
        response = out.sequences[:, length:]
        temperature = request.sampling.temperature if request.sampling.do_sample else 1.0
        logits = torch.stack(out.logits, dim=1).float() / temperature
        logprobs = logits.log_softmax(-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
        return EngineCompletions(response, logprobs, ["length"] * len(response))


def test_engine_logprobs_of_every_turn_line_up_with_the_policy_tokens(repo_path: Any) -> None:
    """Each turn goes to the rollout engine; the log-probs it reports land on that turn's policy tokens (equal to
    the trainer's recomputed ones), zero on environment tokens."""
    pl.seed_everything(0)
    module = GRPOModule(
        "tiny-qwen2", num_generations=2, beta=0.0, rollout_engine="test_multi_turn_reporting", **rl_kwargs()
    )
    module.configure_model()
    rollout = module.generate_rollout(first_batch(text_data(repo_path)), num_samples=2)
    engine = rollout[ENGINE_LOGPROBS]
    mask = rollout.response_mask
    trainer, _ = module.response_log_probs(module.model, rollout)
    assert bool((engine[environment_mask(rollout)] == 0).all())
    torch.testing.assert_close(engine[mask], trainer[mask], rtol=1e-4, atol=1e-4)


def test_a_rank_without_open_episodes_still_joins_every_synced_generate(repo_path: Any) -> None:
    """Under ZeRO-3 with several processes ``generate`` is a collective: a rank whose episodes all ended keeps
    calling it (on a dummy row) while another rank's are open; its own rollout is unchanged by that."""
    pl.seed_everything(0)
    module = GRPOModule("tiny-qwen2", num_generations=2, beta=0.0, **rl_kwargs(environment="tools"))
    module.configure_model()
    batch = first_batch(text_data(repo_path))
    alone = module.generate_rollout(batch, num_samples=2)  # a random policy calls no tool: 1 turn each
    assert alone["policy_turns"].tolist() == [1.0] * 4
    engine = module.rollout_engine()
    calls: list[int] = []
    generate = engine.generate
    engine.generate = lambda mod, request: calls.append(len(request)) or generate(mod, request)  # type: ignore[method-assign]
    module._synced_generation = lambda kwargs: True  # type: ignore[method-assign]
    module._any_rank = lambda count: max(count, 1)  # another rank still has an open episode  # type: ignore[method-assign]
    synced = module.generate_rollout(batch, num_samples=2)
    assert calls == [4, 1, 1]  # every turn joined, the later ones on one dummy row
    assert torch.equal(synced.sequences, alone.sequences) and torch.equal(
        synced.response_mask, alone.response_mask
    )


@pytest.mark.parametrize("name", ["OnlineDPOModule", "BestOfNModule", "SafeRLHFModule"])
def test_the_other_rl_modules_take_an_environment(repo_path: Any, name: str) -> None:
    """Online DPO ranks, best-of-n keeps, Safe-RLHF scores whole episodes (per-turn rewards included, only
    the policy's tokens trained); one rollout each runs with finite numbers."""
    import aa_lightning.algorithms as algorithms

    extra = {
        "OnlineDPOModule": dict(beta=0.1),
        "BestOfNModule": dict(num_generations=2, top_k=1),
        "SafeRLHFModule": dict(cost_functions=[{"name": "response_length", "kwargs": {"scale": 30.0}}]),
    }[name]
    pl.seed_everything(0)
    module = getattr(algorithms, name)("tiny-qwen2", **rl_kwargs(), **extra)
    rec = Recorder()
    fit(module, text_data(repo_path), 1, rec)
    row = rec.rows[-1]
    assert row["rollout/policy_turns"] == 3.0 and row["rollout/turn_reward"] == pytest.approx(3 * TURN_REWARD)
    assert all(math.isfinite(v) for v in row.values())


def test_an_observation_over_the_token_limit_ends_the_episode(repo_path: Any) -> None:
    pl.seed_everything(0)
    module = GRPOModule("tiny-qwen2", num_generations=2, beta=0.0, **rl_kwargs(max_observation_tokens=3))
    module.configure_model()
    rollout = module.generate_rollout(first_batch(text_data(repo_path)), num_samples=2)
    assert (
        rollout["observation_overflow"].tolist() == [1.0] * 4
        and rollout["policy_turns"].tolist() == [1.0] * 4
    )
    assert not bool(environment_mask(rollout).any())  # nothing of the refused observation was appended
    assert [m["role"] for m in rollout.metas[0][CONVERSATION]] == ["prompt", "assistant"]


def test_overlong_shaping_with_an_environment_needs_its_own_max_length() -> None:
    with pytest.raises(ValueError, match="set overlong_max_length"):
        GRPOModule("tiny-qwen2", overlong_buffer_length=2, **rl_kwargs())
    module = GRPOModule("tiny-qwen2", overlong_buffer_length=2, overlong_max_length=12, **rl_kwargs())
    assert module.overlong_max_length == 12


def test_an_image_output_family_is_refused() -> None:
    module = GRPOModule(
        "tiny-emu3",
        **rl_kwargs(reward_functions=[{"name": "image_color", "kwargs": {"color": [255, 0, 0]}}]),
    )
    module.configure_model()
    ids = torch.ones((1, 3), dtype=torch.long)
    with pytest.raises(ValueError, match="non-text outputs"):
        module.generate_rollout({"input_ids": ids, "attention_mask": ids})


def test_the_constant_loss_normaliser_counts_every_policy_turn() -> None:
    """Dr. GRPO's ``constant`` normaliser is the most policy tokens an episode holds: max_turns * max_new_tokens."""
    module = GRPOModule("tiny-qwen2", loss_aggregation="constant", **rl_kwargs())  # 3 turns x 4 tokens
    assert module.max_policy_tokens() == 12
    assert GRPOModule("tiny-qwen2", **rl_kwargs(environment=None)).max_policy_tokens() == 4
    # two episodes, on-policy (ratio 1, so each token's loss is -A): a full one (3 turns x 4 = 12 policy tokens,
    # A = 1) and one of 5 policy tokens (A = -2): (-12 * 1 + 5 * 2) / (2 episodes * 12) = -2 / 24
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0], mask[1, :5] = True, True
    out = grpo_loss(
        torch.zeros(2, 12),
        None,
        None,
        torch.tensor([1.0, -2.0]),
        mask,
        beta=0.0,
        aggregation="constant",
        max_completion_length=module.max_policy_tokens(),
    )
    assert out.loss.item() == pytest.approx(-2 / 24)


def test_a_transcript_that_would_outgrow_the_engine_limit_ends_before_the_request(repo_path: Any) -> None:
    """The hf engine's limit is the model's max_position_embeddings: set so that every first turn fits (prompt +
    max_new_tokens) but no second one does, every episode ends after one turn, logged as cut."""
    pl.seed_everything(0)
    module = GRPOModule("tiny-qwen2", num_generations=2, beta=0.0, **rl_kwargs())
    module.configure_model()
    batch = first_batch(text_data(repo_path))
    config = unwrap(module.model).config
    assert module.rollout_engine().max_sequence_length(module) == config.max_position_embeddings
    longest_prompt = int(batch["attention_mask"].sum(dim=1).max())
    config.max_position_embeddings = longest_prompt + 4  # max_new_tokens = 4
    rollout = module.generate_rollout(batch, num_samples=2)
    assert rollout["transcript_cut"].tolist() == [1.0] * 4 and rollout["policy_turns"].tolist() == [1.0] * 4
    assert not bool(environment_mask(rollout).any())  # nothing of the next turn's observation was appended
    assert rollout["observation_overflow"].tolist() == [0.0] * 4
    # with room for every turn nothing is cut: 3 policy turns each
    config.max_position_embeddings = 4096
    rollout = module.generate_rollout(batch, num_samples=2)
    assert rollout["transcript_cut"].tolist() == [0.0] * 4 and rollout["policy_turns"].tolist() == [3.0] * 4
