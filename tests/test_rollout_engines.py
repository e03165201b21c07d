"""The rollout-engine contract on CPU (no vLLM needed): TIS weights and losses against hand-computed numbers,
the registry and config key, and an engine that reports its sampling log-probs driving GRPO and PPO.

The reporting engine is the default ``generate`` asked for its logits (``output_logits``): its log-probs are
the KV-cached sampling ones, so their gap to the trainer's recomputed (padded, full-sequence) log-probs is
float noise; an ``offset`` added to them shows that the gap metric and the TIS weights read exactly them.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, ClassVar

import lightning.pytorch as pl
import pytest
import torch

from aa_lightning.algorithms import GenerationConfig, GRPOModule, LoraConfig, OptimConfig, PPOModule
from aa_lightning.algorithms.export import merged_lora_state_dict
from aa_lightning.algorithms.losses import grpo_loss, ppo_policy_loss, truncated_importance_weights
from aa_lightning.algorithms.rl.rollout_engines import (
    EngineCompletions,
    EngineRequest,
    build_rollout_engine,
    register_rollout_engine,
    rollout_engine_names,
)
from aa_lightning.algorithms.rl.rollout_engines.hf import HFGenerateEngine
from aa_lightning.algorithms.rl.rollout_engines.vllm_engine import VLLMEngine, policy_weights
from aa_lightning.data import TextToTextDataModule
from aa_lightning.environments import Environment, EnvironmentStep, register_environment
from aa_lightning.models.unwrap import unwrap
from aa_lightning.rewards import RewardSpec

E_SHARE = [RewardSpec("target_token_share", kwargs={"target": "e"})]


@register_rollout_engine("test_reporting_hf")
class ReportingHFEngine(HFGenerateEngine):
    """``generate`` that also returns the log-probs of its sampled tokens (+ ``offset``) and counts syncs."""

    reports_logprobs = True

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset
        self.weight_updates = 0

    def generate(self, module: Any, request: EngineRequest) -> EngineCompletions:
        kwargs = module.generation_kwargs(request.do_sample)
        prompt_length = request.inputs["input_ids"].shape[1]
        out = module.model.generate(
            **request.inputs, **kwargs, output_logits=True, return_dict_in_generate=True
        )
        response = out.sequences[:, prompt_length:]
        temperature = request.sampling.temperature if request.sampling.do_sample else 1.0
        logits = torch.stack(out.logits, dim=1).float() / temperature
        logprobs = logits.log_softmax(-1).gather(-1, response.unsqueeze(-1)).squeeze(-1) + self.offset
        return EngineCompletions(response, logprobs, ["length"] * len(response))

    def on_weights_updated(self, module: Any) -> None:
        self.weight_updates += 1


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _fit(module: pl.LightningModule, repo_path: Any, rollouts: int, **trainer_kwargs: Any) -> Recorder:
    dm = TextToTextDataModule(
        model_name_or_path="tiny-qwen2",
        train={"path": repo_path("configs/data/alpaca_200.json"), "template": "Alpaca", "size": 16},
        max_length=64,
        batch_size=4,
    )
    rec = Recorder()
    trainer = pl.Trainer(
        max_steps=rollouts * module.updates_per_rollout(),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[rec],
        **trainer_kwargs,
    )
    trainer.fit(module, dm)
    return rec


def _grpo(**kwargs: Any) -> GRPOModule:
    args: dict[str, Any] = dict(
        model_name_or_path="tiny-qwen2",
        reward_functions=E_SHARE,
        num_generations=2,
        beta=0.0,
        generation=GenerationConfig(max_new_tokens=4),
        sample_log_interval=0,
        optim=OptimConfig(lr=3e-2, warmup_steps=0, scheduler="constant"),
    )
    args.update(kwargs)
    return GRPOModule(**args)


# -- TIS, by hand ------------------------------------------------------------------------------------------
def test_tis_weights_are_the_capped_trainer_over_engine_ratio() -> None:
    trainer = torch.tensor([[-1.0, -2.0, -0.1]])
    engine = torch.tensor([[-1.5, -1.0, -1.3]])
    w = truncated_importance_weights(trainer, engine, cap=2.0)
    # exp(0.5) = 1.6487213, exp(-1) = 0.3678794, exp(1.2) = 3.3201 -> capped at 2
    torch.testing.assert_close(w, torch.tensor([[1.6487213, 0.3678794, 2.0]]))
    assert not w.requires_grad


def test_tis_weights_scale_the_grpo_and_ppo_token_gradients() -> None:
    trainer = torch.tensor([[-1.0, -2.0, -0.1]])
    w = truncated_importance_weights(trainer, torch.tensor([[-1.5, -1.0, -1.3]]), cap=2.0)
    mask = torch.ones(1, 3, dtype=torch.bool)
    # GRPO, one on-policy pass (ratio 1), A = 1, token mean: loss = -sum_t w_t / 3, dloss/dlogp_t = -w_t / 3
    lp = trainer.clone().requires_grad_(True)
    out = grpo_loss(lp, None, None, torch.tensor([1.0]), mask, beta=0.0, importance_weights=w)
    expected = -(1.6487213 + 0.3678794 + 2.0) / 3
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(lp.grad, -w / 3)
    # PPO: logp = old + [0, 0.1, -0.1], A = 2, eps = 0.2 (no clipping) -> l_t = -2 * w_t * exp(d_t)
    delta = torch.tensor([[0.0, 0.1, -0.1]])
    out = ppo_policy_loss(trainer + delta, trainer, torch.tensor([2.0]), mask, 0.2, importance_weights=w)
    manual = -2 * (1.6487213 * 1.0 + 0.3678794 * math.exp(0.1) + 2.0 * math.exp(-0.1)) / 3
    assert out.loss.item() == pytest.approx(manual, abs=1e-6)
    # no weights: the loss is unchanged (the default engine's path)
    plain = grpo_loss(trainer, None, None, torch.tensor([1.0]), mask, beta=0.0)
    assert plain.loss.item() == pytest.approx(-1.0)


# -- registry and config key -------------------------------------------------------------------------------
def test_engines_are_named_by_config() -> None:
    assert {"hf", "vllm"} <= set(rollout_engine_names())
    with pytest.raises(KeyError, match="unknown rollout engine 'hff'.*did you mean 'hf'"):
        _grpo(rollout_engine="hff")
    with pytest.raises(TypeError, match="rollout_engine_args for rollout engine 'test_reporting_hf'"):
        build_rollout_engine("test_reporting_hf", {"no_such_option": 1})


def test_tis_with_an_engine_that_reports_no_logprobs_is_refused(repo_path: Any) -> None:
    with pytest.raises(ValueError, match="rollout engine 'hf' reports no sampling log-probs"):
        _fit(_grpo(tis_cap=2.0), repo_path, 1)


def test_tis_with_top_p_or_top_k_sampling_is_refused_unless_opted_in() -> None:
    # the engine's log-probs are of the truncated distribution, the trainer's of the full one
    for truncation in ({"top_p": 0.9}, {"top_k": 5}):
        generation = GenerationConfig(max_new_tokens=4, **truncation)
        with pytest.raises(ValueError, match="after top-k/top-p truncation.*tis_with_truncated_sampling"):
            _grpo(tis_cap=2.0, generation=generation)
        opted_in = _grpo(tis_cap=2.0, generation=generation, tis_with_truncated_sampling=True)
        assert opted_in.tis_with_truncated_sampling
        _grpo(generation=generation)  # no TIS: nothing to refuse
    _grpo(tis_cap=2.0, generation=GenerationConfig(max_new_tokens=4, temperature=0.7))  # both sides scale
    _grpo(tis_cap=2.0, generation=GenerationConfig(max_new_tokens=4, top_p=0.9, do_sample=False))  # greedy


# -- a reporting engine through GRPO and PPO ---------------------------------------------------------------
def test_grpo_logs_the_sampling_gap_and_the_engine_hears_every_update(repo_path: Any) -> None:
    module = _grpo(rollout_engine="test_reporting_hf", num_iterations=2)
    rec = _fit(module, repo_path, 2)
    engine = module.__dict__.get("_rollout_engine_instance")
    assert engine is None  # closed at the end of fit
    gaps = [row["rollout/engine_logprob_gap"] for row in rec.rows]
    assert len(gaps) == 2 and max(gaps) < 1e-4  # KV-cached sampling log-probs == recomputed ones


def test_offset_engine_logprobs_give_that_gap_and_tis_weights(repo_path: Any) -> None:
    updates: list[int] = []
    module = _grpo(rollout_engine="test_reporting_hf", rollout_engine_args={"offset": 0.5}, tis_cap=1.5)
    original = module.close_rollout_engine

    def close() -> None:
        updates.append(module.rollout_engine().weight_updates)
        original()

    module.close_rollout_engine = close  # type: ignore[method-assign]
    rec = _fit(module, repo_path, 2)
    assert updates == [2]  # one optimizer update per rollout, each one announced
    for row in rec.rows:
        assert row["rollout/engine_logprob_gap"] == pytest.approx(0.5, abs=1e-4)
        assert row["train/tis_weight"] == pytest.approx(math.exp(-0.5), abs=1e-4)
        assert row["train/tis_capped_fraction"] == 0.0


def test_ppo_logs_the_gap_from_its_old_logprobs(repo_path: Any) -> None:
    module = PPOModule(
        model_name_or_path="tiny-qwen2",
        reward_functions=E_SHARE,
        generation=GenerationConfig(max_new_tokens=4),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, scheduler="constant"),
        kl_coef=0.0,
        sample_log_interval=0,
        rollout_engine="test_reporting_hf",
        rollout_engine_args={"offset": -0.25},
        tis_cap=10.0,
    )
    rec = _fit(module, repo_path, 1)
    assert rec.rows[0]["rollout/engine_logprob_gap"] == pytest.approx(0.25, abs=1e-4)
    assert rec.rows[0]["train/tis_weight"] == pytest.approx(math.exp(0.25), abs=1e-4)


# -- the weight stream of the vLLM sync, without vLLM --------------------------------------------------------
@register_rollout_engine("test_streaming")
class StreamingEngine(ReportingHFEngine):
    """Consumes the vLLM engine's weight stream after every update, as vLLM's reload would."""

    def __init__(self) -> None:
        super().__init__()
        self.streamed: dict[str, torch.Tensor] = {}
        self.most_gathered = 0
        self.total = 0

    def on_weights_updated(self, module: Any) -> None:
        super().on_weights_updated(module)
        params = list(unwrap(module.model).parameters())
        self.total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        for name, tensor in policy_weights(module.model):
            # a ZeRO-3 parameter holds 0 local elements unless it is gathered right now
            self.most_gathered = max(self.most_gathered, sum(p.numel() for p in params))
            self.streamed[name] = tensor.detach().cpu().clone()


def test_lora_weight_stream_is_the_merged_state_dict(repo_path: Any) -> None:
    module = _grpo(rollout_engine="test_streaming", lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    captured: list[StreamingEngine] = []
    original = module.close_rollout_engine
    module.close_rollout_engine = lambda: (captured.append(module.rollout_engine()), original())[-1]  # type: ignore[method-assign]
    _fit(module, repo_path, 2)
    merged = merged_lora_state_dict(module.model)
    streamed = captured[0].streamed
    assert set(streamed) == set(merged) and not any("lora_" in k or "base_layer" in k for k in streamed)
    for name, tensor in merged.items():
        torch.testing.assert_close(streamed[name], tensor, rtol=0, atol=0)
    delta = (
        merged["model.layers.0.self_attn.q_proj.weight"]
        - module.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.detach()
    )
    assert delta.abs().max() > 0  # the adapters moved: the stream carries them merged


def test_zero3_weight_stream_gathers_one_module_at_a_time(repo_path: Any) -> None:
    from aa_lightning.strategies import CPUDeepSpeedStrategy, zero_config

    config = zero_config(stage=3)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # shard even tiny tensors
    module = _grpo(rollout_engine="test_streaming")
    captured: list[StreamingEngine] = []
    original = module.close_rollout_engine
    module.close_rollout_engine = lambda: (captured.append(module.rollout_engine()), original())[-1]  # type: ignore[method-assign]
    _fit(module, repo_path, 2, strategy=CPUDeepSpeedStrategy(config=config))
    engine = captured[0]
    # at most one submodule's own parameters are gathered at any moment: the largest is the tied embedding
    largest = max(
        sum(p.ds_numel for p in m.parameters(recurse=False)) for m in unwrap(module.model).modules()
    )
    assert largest == 2048 * 64 and engine.most_gathered == largest < engine.total
    import deepspeed

    params = dict(module.model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, p in params.items():
            torch.testing.assert_close(engine.streamed[name], p.detach().cpu(), rtol=0, atol=0)


def test_vllm_engine_without_vllm_names_the_extra(repo_path: Any) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here: tests/vllm_engine/check_weight_sync.py covers the engine")
    with pytest.raises(ImportError, match=r"aa-lightning\[vllm\]"):
        _fit(_grpo(rollout_engine="vllm"), repo_path, 1)


# -- vLLM's sleep mode: when it sleeps, wakes and re-syncs, without vLLM --------------------------------------
class _FakeLLM:
    """Records the sleep-mode calls the engine makes on ``vllm.LLM``."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096))

    def sleep(self, level: int) -> None:
        self.calls.append(f"sleep{level}")

    def wake_up(self) -> None:
        self.calls.append("wake")


@register_rollout_engine("test_sleeping_vllm")
class SleepingVLLMEngine(VLLMEngine):
    """The vLLM engine's start/wake/sync/sleep bookkeeping, sampling with the policy's own ``generate``."""

    reports_logprobs = False
    instances: ClassVar[list[SleepingVLLMEngine]] = []

    def __init__(self) -> None:
        super().__init__(sleep_mode=True)
        self.calls: list[str] = []
        SleepingVLLMEngine.instances.append(self)

    def start(self, module: Any) -> None:
        self.calls.append("start")
        self.llm, self.stale = _FakeLLM(self.calls), True

    def sync(self, module: Any) -> None:
        self.calls.append("sync")
        self.stale = False

    def on_weights_updated(self, module: Any) -> None:
        self.calls.append("update")
        super().on_weights_updated(module)

    def generate(self, module: Any, request: EngineRequest) -> EngineCompletions:
        self.prepare(module)
        self.calls.append("generate")
        hf = HFGenerateEngine()
        with hf.session(module, request):
            return hf.generate(module, request)


@register_environment("test_engine_tool")
class _EngineTool(Environment):
    def step(self, conversation: list[dict], meta: dict) -> EnvironmentStep:
        return EnvironmentStep([{"role": "tool", "content": "42"}], reward=0.0)


@pytest.mark.parametrize(
    ("kwargs", "generates"),
    [
        # three policy turns per episode: three generate calls per rollout
        ({"environment": "test_engine_tool", "max_turns": 3, "end_on_cut_turn": False}, 3),
        ({"advantage_estimator": "remax", "num_generations": 1}, 2),  # sampled + greedy baseline
    ],
)
def test_sleep_mode_sleeps_once_per_update_phase_and_resyncs_only_after_it(
    repo_path: Any, kwargs: dict[str, Any], generates: int
) -> None:
    SleepingVLLMEngine.instances.clear()
    module = _grpo(rollout_engine="test_sleeping_vllm", num_mini_batches=2, **kwargs)
    _fit(module, repo_path, 2)
    # two minibatches, two updates per rollout: ONE sleep before the first, no wake or sync between turns
    rollout = ["generate"] * generates + ["sleep2", "update", "update"]
    assert SleepingVLLMEngine.instances[0].calls == ["start", "sync", *rollout, "wake", "sync", *rollout]
