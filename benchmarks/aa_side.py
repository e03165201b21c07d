"""The aa-lightning side of each workload: the real modules and datamodule, driven by a Lightning Trainer.

Settings mirror :func:`benchmarks.trl_side.common_args`: AdamW (betas 0.9/0.999, eps 1e-8, no weight decay),
constant learning rate without warm-up, gradient clipping at the same norm, in-order batches, no checkpoints,
no validation, metrics logged every ``log_every`` steps.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.common import BenchConfig, CountingCollator, StepTimer, make_result


def optim_config(config: BenchConfig) -> Any:
    from aa_lightning.algorithms.config import OptimConfig

    return OptimConfig(
        lr=config.lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, warmup_steps=0, scheduler="constant"
    )


def module_kwargs(config: BenchConfig) -> dict[str, Any]:
    """What every aa-side module of a workload is built with: the model, fp32 weights, attention, optimizer."""
    return {
        "model_name_or_path": config.model_path,
        "dtype": "float32",
        "attn_implementation": config.attn,
        "optim": optim_config(config),
    }


def datamodule(config: BenchConfig, **kwargs: Any) -> Any:
    """The text datamodule on the prepared rows, counting the non-pad tokens of every batch it collates."""
    from aa_lightning.data import TextToTextDataModule

    class CountingDataModule(TextToTextDataModule):
        counter: CountingCollator | None = None

        def build_collator(self, kind: str) -> Any:
            # the training loader is the last one built (a reference pre-pass may build one before it)
            self.counter = CountingCollator(super().build_collator(kind))
            return self.counter

    options = dict(
        model_name_or_path=config.model_path,
        train={"path": config.data_file, "template": config.extra["template"]},
        max_length=config.max_length,
        batch_size=config.batch_size,
        num_workers=0,
        shuffle=False,
        seed=config.seed,
    )
    options.update(kwargs)
    return CountingDataModule(**options)


def trainer(config: BenchConfig, timer: StepTimer, clip_in_module: bool = False) -> Any:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    class _Timer(pl.Callback):
        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            timer.step_end()

    return pl.Trainer(
        accelerator="gpu" if config.device.startswith("cuda") else "cpu",
        devices=1,
        max_steps=config.steps,
        precision="bf16-mixed" if config.bf16 else "32-true",
        gradient_clip_val=None if clip_in_module else config.max_grad_norm,  # RL modules clip themselves
        logger=CSVLogger(os.path.join(config.work_dir, "aa_logs")),
        log_every_n_steps=config.log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=config.work_dir,
        callbacks=[_Timer()],
        deterministic=False,
    )


def fit(
    module: Any, data: Any, config: BenchConfig, unit: str, per_step: float, clip_in_module: bool = False
) -> dict[str, Any]:
    import lightning.pytorch as pl

    pl.seed_everything(config.seed, verbose=False)
    timer = StepTimer(config.device)
    trainer(config, timer, clip_in_module).fit(module, datamodule=data)
    counter = data.counter if unit == "samples" else None
    return make_result(
        config,
        timer,
        unit,
        per_step,
        counter.counts if counter is not None else None,
        counter.square_sums if counter is not None else None,
    )


def padding_free(config: BenchConfig) -> bool:
    """The ``*_padding_free`` rows: the same workload with ``padding_free=True`` (rows packed, no pad positions)."""
    return config.workload.endswith("_padding_free")


def run_sft(config: BenchConfig) -> dict[str, Any]:
    from aa_lightning.algorithms import SFTModule

    module = SFTModule(
        **module_kwargs(config),
        padding_free=padding_free(config),
    )
    return fit(module, datamodule(config, train_on="last_assistant"), config, "samples", config.batch_size)


def run_dpo(config: BenchConfig, precompute: bool = False) -> dict[str, Any]:
    from aa_lightning.algorithms import DPOModule

    module = DPOModule(
        **module_kwargs(config),
        beta=config.beta,
        loss_type="sigmoid",
        precompute_ref_log_probs=precompute,
        ref_cache_dir=os.path.join(config.work_dir, "ref_logps") if precompute else None,
        padding_free=padding_free(config),
    )
    data = datamodule(config, train_on="last_assistant")
    return fit(module, data, config, "samples", config.batch_size)


def run_dpo_precomputed(config: BenchConfig) -> dict[str, Any]:
    return run_dpo(config, precompute=True)


def run_rm(config: BenchConfig) -> dict[str, Any]:
    from aa_lightning.algorithms.reward import RewardModule

    module = RewardModule(
        **module_kwargs(config),
        padding_free=padding_free(config),
        new_score_head=True,
    )
    return fit(module, datamodule(config, train_on="last_assistant"), config, "samples", config.batch_size)


RUNNERS = {
    "sft": run_sft,
    "sft_padding_free": run_sft,
    "dpo": run_dpo,
    "dpo_padding_free": run_dpo,
    "dpo_precomputed": run_dpo_precomputed,
    "rm": run_rm,
    "rm_padding_free": run_rm,
}


def grpo_module(config: BenchConfig, module_class: Any = None, **overrides: Any) -> Any:
    """The GRPO workload's module (``module_class``: a GRPOModule subclass); ``overrides`` replace arguments."""
    from aa_lightning.algorithms import GenerationConfig, GRPOModule
    from aa_lightning.rewards import RewardSpec

    args: dict[str, Any] = dict(
        num_generations=config.num_generations,
        beta=config.grpo_beta,
        clip_range=0.2,
        scale="std",
        loss_aggregation="token_mean",
        num_iterations=1,
    )
    return (module_class or GRPOModule)(
        **module_kwargs(config),
        reward_functions=[RewardSpec(name="gsm8k_answer")],
        generation=GenerationConfig(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=1.0,
            top_k=0,
            do_sample=True,
        ),
        max_grad_norm=config.max_grad_norm,
        sample_log_interval=0,
        **{**args, **overrides},
    )


def run_grpo(config: BenchConfig, **overrides: Any) -> dict[str, Any]:
    """GRPOModule; ``overrides`` replace its arguments (the GSPO row)."""
    module = grpo_module(config, **overrides)
    data = datamodule(config, batch_size=config.prompts_per_step)
    per_step = config.prompts_per_step * config.num_generations
    return fit(module, data, config, "completions", per_step, clip_in_module=True)


RUNNERS["grpo"] = run_grpo


def run_gspo(config: BenchConfig) -> dict[str, Any]:
    """The same GSPO recipe as the TRL side: sequence ratio, clip 3e-4 / 4e-4, no KL, per-sequence mean."""
    return run_grpo(
        config,
        policy_loss="gspo",
        clip_range=3e-4,
        clip_range_high=4e-4,
        beta=0.0,
        loss_aggregation="sequence_mean",
    )


RUNNERS["gspo"] = run_gspo


def run_grpo_vllm(config: BenchConfig) -> dict[str, Any]:
    """The ``grpo`` workload with ``rollout_engine: config.extra["engine"]`` (``benchmarks.grpo_vllm``):
    the steady-state rate plus the time spent sampling, the engine's start and weight-sync times and the last
    engine-trainer log-prob gap."""
    import time

    from aa_lightning.algorithms import GRPOModule
    from benchmarks.common import synchronize

    class TimedGRPO(GRPOModule):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.sampling_s: list[float] = []
            self.engine_stats: dict[str, Any] = {}

        def generate_rollout(self, *args: Any, **kwargs: Any) -> Any:
            synchronize(config.device)
            start = time.perf_counter()
            rollout = super().generate_rollout(*args, **kwargs)  # the vLLM weight sync included
            synchronize(config.device)
            self.sampling_s.append(time.perf_counter() - start)
            return rollout

        def close_rollout_engine(self) -> None:
            engine = self.__dict__.get("_rollout_engine_instance")
            self.engine_stats = {
                "start_s": getattr(engine, "start_seconds", None),
                "sync_s": list(getattr(engine, "sync_seconds", [])),
            }
            self.engine_stats["gap"] = float(
                self.trainer.callback_metrics.get("rollout/engine_logprob_gap", -1)
            )
            super().close_rollout_engine()

    engine = config.extra["engine"]
    module = grpo_module(
        config,
        TimedGRPO,
        rollout_engine=engine,
        rollout_engine_args=dict(config.extra.get("engine_args", {})),
    )
    data = datamodule(config, batch_size=config.prompts_per_step)
    per_step = config.prompts_per_step * config.num_generations
    result = fit(module, data, config, "completions", per_step, clip_in_module=True)
    steady = module.sampling_s[1:]  # step 1 (engine start, warm-up) is not timed, as for the rate
    result["engine"] = engine
    result["sampling_s_per_step"] = sum(steady) / len(steady) if steady else float("nan")
    result["sampling_share"] = (
        sum(steady) / result["seconds"] if steady and result["seconds"] else float("nan")
    )
    result.update({f"engine_{k}": v for k, v in module.engine_stats.items()})
    return result


RUNNERS["grpo_vllm"] = run_grpo_vllm


PPO_PHASES = ("generation", "reward scoring", "old/ref/value forwards", "advantages", "update")


def score_model_folder(config: BenchConfig) -> str:
    """The benchmark model with a seeded score head, saved once under the work dir (a frozen reward model must
    have a trained head; its values do not matter for timing)."""
    from aa_lightning.models import load_pretrained_models
    from aa_lightning.models.score_model import has_score_head

    folder = os.path.join(config.work_dir, "score_model")
    if not has_score_head(folder):
        import torch

        torch.manual_seed(0)
        model, tokenizer, _ = load_pretrained_models(
            config.model_path, dtype="float32", score_model=True, new_score_head=True
        )
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def run_ppo(config: BenchConfig) -> dict[str, Any]:
    """PPO (aa-lightning only): where a step's time goes, and generation speed against plain ``generate``."""
    import time

    import torch

    from aa_lightning.algorithms import GenerationConfig, PPOModule
    from aa_lightning.rewards import RewardSpec
    from benchmarks.common import synchronize

    class TimedPPO(PPOModule):
        """PPOModule with a stopwatch around each phase of a step (the phases themselves are unchanged)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.phase_times: list[dict[str, float]] = []
            self.generated: list[tuple[int, int]] = []  # (response tokens kept, rows x decode steps)

        def timed(self, name: str, fn: Any, *args: Any) -> Any:
            synchronize(config.device)
            start = time.perf_counter()
            out = fn(*args)
            synchronize(config.device)
            self.phase_times[-1][name] = self.phase_times[-1].get(name, 0.0) + time.perf_counter() - start
            return out

        def training_step(self, batch: Any, batch_idx: int) -> None:
            self.phase_times.append({})
            return super().training_step(batch, batch_idx)

        def generate_rollout(self, *args: Any, **kwargs: Any) -> Any:
            rollout = self.timed(
                "generation", lambda: super(TimedPPO, self).generate_rollout(*args, **kwargs)
            )
            self.generated.append((int(rollout.response_mask.sum()), rollout.response_ids.numel()))
            return rollout

        def score_rollout(self, *args: Any) -> None:
            self.timed("reward scoring", super().score_rollout, *args)

        def forward_rollout(self, *args: Any) -> None:
            self.timed("old/ref/value forwards", super().forward_rollout, *args)

        def compute_advantages(self, *args: Any) -> None:
            self.timed("advantages", super().compute_advantages, *args)

        def update(self, *args: Any) -> None:
            self.timed("update", super().update, *args)

    gen = GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=1.0,
        top_k=0,
        do_sample=True,
    )
    module = TimedPPO(
        **module_kwargs(config),
        reward_model_name_or_path=score_model_folder(
            config
        ),  # same backbone + a fixed head: a real scoring forward
        reward_functions=[RewardSpec(name="gsm8k_answer")],
        generation=gen,
        max_grad_norm=config.max_grad_norm,
        sample_log_interval=0,
    )
    data = datamodule(config)
    result = fit(module, data, config, "completions", config.batch_size, clip_in_module=True)

    # plain model.generate on the same prompt batches: the upper bound of the rollout's generation speed
    model = module.model
    model.eval()
    kwargs = module.generation_kwargs()
    plain: list[tuple[float, int]] = []
    with torch.no_grad():
        for i, batch in zip(range(min(config.steps, 4)), data.train_dataloader()):
            inputs = {k: batch[k].to(module.device) for k in ("input_ids", "attention_mask")}
            synchronize(config.device)
            start = time.perf_counter()
            out = model.generate(**inputs, **kwargs)
            synchronize(config.device)
            if i:  # the first call warms up
                plain.append((time.perf_counter() - start, out[:, inputs["input_ids"].shape[1] :].numel()))
    steady = module.phase_times[1:]
    step_s = sum(sum(t.values()) for t in steady) / max(len(steady), 1)
    lines = [
        f"PPO step breakdown (aa-lightning, {len(steady)} steady steps, batch {config.batch_size} prompts, "
        f"{config.max_new_tokens} new tokens, actor + reference + reward model + critic):",
        "",
        "| phase | s/step | share |",
        "|---|---|---|",
    ]
    for name in PPO_PHASES:
        value = sum(t.get(name, 0.0) for t in steady) / max(len(steady), 1)
        lines.append(f"| {name} | {value:.3f} | {100 * value / step_s if step_s else 0:.0f}% |")
    whole = result["step_s"]
    lines.append(
        f"| other (logging, loop) | {max(whole - step_s, 0.0):.3f} | "
        f"{100 * max(whole - step_s, 0.0) / whole if whole else 0:.0f}% |"
    )
    gen_s = sum(t.get("generation", 0.0) for t in steady)
    gen_tokens = sum(g[1] for g in module.generated[1:])
    rollout_tps = gen_tokens / gen_s if gen_s else float("nan")
    plain_tps = sum(n for _, n in plain) / sum(s for s, _ in plain) if plain else float("nan")
    lines += [
        "",
        f"Generation: {rollout_tps:.0f} tokens/s inside the rollout vs {plain_tps:.0f} tokens/s for plain "
        f"`model.generate` on the same prompts ({rollout_tps / plain_tps:.2f}x of the upper bound); tokens = "
        "rows x decode steps.",
    ]
    result.update(
        breakdown="\n".join(lines),
        rollout_tokens_per_s=rollout_tps,
        plain_generate_tokens_per_s=plain_tps,
        phases={name: sum(t.get(name, 0.0) for t in steady) / max(len(steady), 1) for name in PPO_PHASES},
    )
    return result


RUNNERS["ppo"] = run_ppo


def run_dpo_sparse_head(config: BenchConfig) -> dict[str, Any]:
    """DPO with the policy and reference log-probs from ``causal_lm_log_probs`` (LM head on labelled positions
    only): the change proposed for ``DPOModule``, measured here through a subclass (``PolicyModule`` and
    ``ReferencePolicyModule`` in ``algorithms/policy.py`` now do the same; kept so the row can be re-run)."""
    from aa_lightning.algorithms import DPOModule
    from aa_lightning.algorithms.logprobs import causal_lm_log_probs
    from aa_lightning.batch import LABELS, model_inputs

    class SparseHeadDPO(DPOModule):
        def policy_log_probs(self, batch: dict[str, Any]) -> Any:
            return causal_lm_log_probs(self.model, model_inputs(batch, self.model), batch[LABELS])

        def reference_log_probs_live(self, batch: dict[str, Any]) -> Any:
            with self.frozen.running("reference", self.model) as ref:
                return causal_lm_log_probs(ref, model_inputs(batch, ref), batch[LABELS])

    module = SparseHeadDPO(
        **module_kwargs(config),
        beta=config.beta,
        loss_type="sigmoid",
    )
    return fit(module, datamodule(config, train_on="last_assistant"), config, "samples", config.batch_size)


RUNNERS["dpo_sparse_head"] = run_dpo_sparse_head


def run_kto(config: BenchConfig) -> dict[str, Any]:
    """KTOModule on the same unpaired rows (``KTO`` template), KL reference point from mismatched pairs."""
    from aa_lightning.algorithms import KTOModule

    module = KTOModule(
        **module_kwargs(config),
        beta=config.beta,
    )
    data = datamodule(config, train_on="last_assistant")
    return fit(module, data, config, "samples", config.batch_size)


RUNNERS["kto"] = run_kto


def run_rloo(config: BenchConfig) -> dict[str, Any]:
    """RLOO as TRL's RLOOTrainer runs it: leave-one-out baseline, no KL term; the loss sums each completion's
    tokens (``constant`` aggregation: TRL's per-sequence sum up to a constant factor)."""
    return run_grpo(config, advantage_estimator="rloo", beta=0.0, loss_aggregation="constant", clip_range=0.2)


RUNNERS["rloo"] = run_rloo


def run_online_dpo(config: BenchConfig) -> dict[str, Any]:
    """OnlineDPOModule: two completions per prompt in one ``generate``, ranked by the final-answer reward."""
    from aa_lightning.algorithms import GenerationConfig
    from aa_lightning.algorithms.rl.online_dpo import OnlineDPOModule
    from aa_lightning.rewards import RewardSpec
    from benchmarks.common import online_dpo_prompts

    module = OnlineDPOModule(
        **module_kwargs(config),
        reward_functions=[RewardSpec(name="gsm8k_answer")],
        generation=GenerationConfig(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=1.0,
            top_k=0,
            do_sample=True,
        ),
        beta=config.beta,
        loss_type="sigmoid",
        max_grad_norm=config.max_grad_norm,
        sample_log_interval=0,
    )
    prompts = online_dpo_prompts(config)
    data = datamodule(config, batch_size=prompts)
    return fit(module, data, config, "completions", 2 * prompts, clip_in_module=True)


RUNNERS["online_dpo"] = run_online_dpo
