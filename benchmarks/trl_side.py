"""The TRL side of each workload (TRL 1.16 trainers with the settings both sides share).

Never imports aa-lightning: the rows arrive already formatted (``benchmarks.run`` renders them with
aa-lightning's formatters in the parent process), so both sides train on the same conversations.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from benchmarks.common import (
    BenchConfig,
    CountingCollator,
    StepTimer,
    make_result,
    online_dpo_prompts,
    read_jsonl,
)


def common_args(config: BenchConfig) -> dict[str, Any]:
    """TrainingArguments both sides match: AdamW, constant lr, clipping, no checkpointing/eval, fp32 or bf16."""
    return dict(
        output_dir=os.path.join(config.work_dir, "trl_out"),
        per_device_train_batch_size=config.batch_size,
        max_steps=config.steps,
        learning_rate=config.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=config.max_grad_norm,
        gradient_checkpointing=False,
        bf16=config.bf16,
        fp16=False,
        use_cpu=config.device == "cpu",
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=config.log_every,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        train_sampling_strategy="sequential",
        seed=config.seed,
        data_seed=config.seed,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": config.attn},
    )


def timer_callback(timer: StepTimer) -> Any:
    from transformers import TrainerCallback

    class _Timer(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            timer.step_end()

    return _Timer()


def tokenizer(config: BenchConfig) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.model_path)


def train(trainer: Any, config: BenchConfig, timer: StepTimer) -> CountingCollator:
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()
    return counter


def run_sft(config: BenchConfig, padding_free: bool = False) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = read_jsonl(config.data_file)
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    args = SFTConfig(
        **common_args(config),
        max_length=config.max_length,
        packing=False,
        padding_free=padding_free,
        completion_only_loss=True,
    )
    timer = StepTimer(config.device)
    trainer = SFTTrainer(
        model=config.model_path,
        args=args,
        train_dataset=data,
        processing_class=tokenizer(config),
        callbacks=[timer_callback(timer)],
    )
    counter = train(trainer, config, timer)
    return make_result(config, timer, "samples", config.batch_size, counter.counts)


def run_dpo(config: BenchConfig) -> dict[str, Any]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = read_jsonl(config.data_file)
    data = Dataset.from_list(
        [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    )
    args = DPOConfig(
        **common_args(config),
        beta=config.beta,
        loss_type=["sigmoid"],
        max_length=config.max_length,
        precompute_ref_log_probs=False,
    )
    timer = StepTimer(config.device)
    trainer = DPOTrainer(
        model=config.model_path,
        args=args,
        train_dataset=data,
        processing_class=tokenizer(config),
        callbacks=[timer_callback(timer)],
    )
    counter = train(trainer, config, timer)
    return make_result(config, timer, "samples", config.batch_size, counter.counts)


def run_rm(config: BenchConfig) -> dict[str, Any]:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    rows = read_jsonl(config.data_file)
    data = Dataset.from_list(
        [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    )
    args = RewardConfig(**common_args(config), max_length=config.max_length)
    timer = StepTimer(config.device)
    trainer = RewardTrainer(
        model=config.model_path,
        args=args,
        train_dataset=data,
        processing_class=tokenizer(config),
        callbacks=[timer_callback(timer)],
    )
    counter = train(trainer, config, timer)
    return make_result(config, timer, "samples", config.batch_size, counter.counts)


def run_sft_padding_free(config: BenchConfig) -> dict[str, Any]:
    """SFTTrainer(padding_free=True): rows concatenated with position ids; only exact with varlen attention."""
    if not config.attn.startswith("flash_attention"):
        raise SystemExit(f"TRL's padding_free SFT needs flash-attention (got attn={config.attn!r})")
    return run_sft(config, padding_free=True)


RUNNERS = {"sft": run_sft, "sft_padding_free": run_sft_padding_free, "dpo": run_dpo, "rm": run_rm}


def gsm8k_reward(completions: list[Any], reference_answer: list[str], **kwargs: Any) -> list[float]:
    """The final-answer reward, scored by aa-lightning's rule (a light import: torch only)."""
    from aa_lightning.rewards import gsm8k_answer

    texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
    return [gsm8k_answer("", text, {"reference_answer": ref}) for text, ref in zip(texts, reference_answer)]


def run_grpo(config: BenchConfig, **overrides: Any) -> dict[str, Any]:
    """GRPOTrainer; ``overrides`` replace GRPOConfig fields (the GSPO row)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    rows = read_jsonl(config.data_file)
    data = Dataset.from_list(
        [{"prompt": r["prompt"], "reference_answer": r["reference_answer"]} for r in rows]
    )
    per_step = config.prompts_per_step * config.num_generations
    fields: dict[str, Any] = dict(
        num_generations=config.num_generations,
        max_completion_length=config.max_new_tokens,
        temperature=config.temperature,
        top_p=1.0,
        top_k=0,
        beta=config.grpo_beta,
        num_iterations=1,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        shuffle_dataset=False,
        log_completions=False,
    )
    args = GRPOConfig(
        **{**common_args(config), "per_device_train_batch_size": per_step}, **{**fields, **overrides}
    )
    timer = StepTimer(config.device)
    trainer = GRPOTrainer(
        model=config.model_path,
        reward_funcs=gsm8k_reward,
        args=args,
        train_dataset=data,
        processing_class=tokenizer(config),
        callbacks=[timer_callback(timer)],
    )
    trainer.train()
    return make_result(config, timer, "completions", per_step)


RUNNERS["grpo"] = run_grpo


def run_gspo(config: BenchConfig) -> dict[str, Any]:
    """GSPO (arXiv:2507.18071) as TRL ships it: GRPOTrainer with a sequence-level importance ratio, the
    paper's clip range 3e-4 / 4e-4, no KL term, a per-sequence mean (``loss_type="grpo"``)."""
    return run_grpo(
        config,
        importance_sampling_level="sequence",
        epsilon=3e-4,
        epsilon_high=4e-4,
        beta=0.0,
        loss_type="grpo",
    )


RUNNERS["gspo"] = run_gspo


def run_kto(config: BenchConfig) -> dict[str, Any]:
    """KTOTrainer (unpaired prompt/completion/label rows, KL reference point from mismatched pairs)."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    rows = read_jsonl(config.data_file)
    data = Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"]} for r in rows]
    )
    args = KTOConfig(**common_args(config), beta=config.beta, max_length=config.max_length)
    timer = StepTimer(config.device)
    trainer = KTOTrainer(
        model=config.model_path,
        args=args,
        train_dataset=data,
        processing_class=tokenizer(config),
        callbacks=[timer_callback(timer)],
    )
    counter = train(trainer, config, timer)
    return make_result(config, timer, "samples", config.batch_size, counter.counts)


RUNNERS["kto"] = run_kto


def run_rloo(config: BenchConfig) -> dict[str, Any]:
    """RLOOTrainer: leave-one-out baseline, sequence-level clipped ratio, no KL term (beta 0)."""
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    rows = read_jsonl(config.data_file)
    data = Dataset.from_list(
        [{"prompt": r["prompt"], "reference_answer": r["reference_answer"]} for r in rows]
    )
    per_step = config.prompts_per_step * config.num_generations
    args = RLOOConfig(
        **{**common_args(config), "per_device_train_batch_size": per_step},
        num_generations=config.num_generations,
        max_completion_length=config.max_new_tokens,
        temperature=config.temperature,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        epsilon=0.2,
        normalize_advantages=False,
        shuffle_dataset=False,
        log_completions=False,
    )
    timer = StepTimer(config.device)
    trainer = RLOOTrainer(
        model=config.model_path,
        reward_funcs=gsm8k_reward,
        args=args,
        train_dataset=data,
        processing_class=tokenizer(config),
        callbacks=[timer_callback(timer)],
    )
    trainer.train()
    return make_result(config, timer, "completions", per_step)


RUNNERS["rloo"] = run_rloo


def run_online_dpo(config: BenchConfig) -> dict[str, Any]:
    """Online DPO (``trl.experimental``): two sampled completions per prompt ranked by the reward function."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    rows = read_jsonl(config.data_file)
    data = Dataset.from_list(
        [{"prompt": r["prompt"], "reference_answer": r["reference_answer"]} for r in rows]
    )
    prompts = online_dpo_prompts(config)
    args = OnlineDPOConfig(
        **{**common_args(config), "per_device_train_batch_size": prompts},
        beta=[config.beta],
        loss_type="sigmoid",
        max_new_tokens=config.max_new_tokens,
        max_length=config.max_length + config.max_new_tokens,
        temperature=config.temperature,
        top_p=1.0,
        top_k=0,
    )
    timer = StepTimer(config.device)
    trainer = OnlineDPOTrainer(
        model=config.model_path,
        reward_funcs=gsm8k_reward,
        args=args,
        train_dataset=data,
        processing_class=tokenizer(config),
        callbacks=[timer_callback(timer)],
    )
    trainer.train()
    return make_result(config, timer, "completions", 2 * prompts)


RUNNERS["online_dpo"] = run_online_dpo
