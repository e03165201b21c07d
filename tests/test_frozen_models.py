"""One home for frozen models: under every strategy the reference/reward models are built like the policy.

What is shown: frozen models are submodules (so the strategy shards/casts/moves them), stay in eval mode,
are never trained and never stored in checkpoints; DPO (live and precomputed) and KTO train under ZeRO-3
with a sharded reference and start where the single-process run starts; under bf16 the step-0
policy/reference log-ratio is exactly 0 (DPO, KTO, PPO); LoRA under ZeRO-3 starts with the reference equal
to the policy and exports real (non-empty, merged or adapter-only) weights that reproduce the trained logits.
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import pytest
import synthetic_preferences
import torch

from aa_lightning.algorithms import (
    DPOModule,
    GenerationConfig,
    KTOModule,
    LoraConfig,
    OptimConfig,
    PPOModule,
    SFTModule,
)
from aa_lightning.callbacks import HFExportCallback
from aa_lightning.data import TextToTextDataModule
from aa_lightning.rewards import RewardSpec
from aa_lightning.strategies import CPUDeepSpeedStrategy, zero_config

GOOD = "{t} are lovely. Sure, I am happy to help!"
BAD = "{t} are awful. No, go away now."


def write_jsonl(path: Any, rows: list[dict]) -> str:
    import json

    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture
def pairs(tmp_path: Any) -> str:
    rows = synthetic_preferences.hh_rows(
        synthetic_preferences.topics(seed=0)[:8], GOOD, BAD, question="Tell me about {t}, please."
    )
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


@pytest.fixture
def unpaired(tmp_path: Any) -> str:
    rows = []
    for i, t in enumerate(synthetic_preferences.topics(seed=0)[:8]):
        reply = (GOOD if i % 2 == 0 else BAD).format(t=t.capitalize())
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Tell me about {t}, please."},
                    {"role": "assistant", "content": reply},
                ],
                "label": i % 2 == 0,
            }
        )
    return write_jsonl(tmp_path / "kto.jsonl", rows)


def datamodule(path: str, template: str, batch_size: int = 4) -> TextToTextDataModule:
    return TextToTextDataModule(
        "tiny-qwen2", train={"path": path, "template": template}, max_length=48, batch_size=batch_size
    )


def sharded_zero3() -> CPUDeepSpeedStrategy:
    """ZeRO-3 that partitions even the tiny model's small tensors (the default keeps < 1e5 elements whole)."""
    config = zero_config(stage=3)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return CPUDeepSpeedStrategy(config=config)


class FirstSteps(pl.Callback):
    """The logged metrics of each training step."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(
    module: pl.LightningModule,
    dm: pl.LightningDataModule,
    tmp_path: Any,
    strategy: Any = "auto",
    steps: int = 2,
    precision: str = "32-true",
    callbacks: tuple = (),
) -> FirstSteps:
    recorder = FirstSteps()
    pl.seed_everything(0)
    pl.Trainer(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder, *callbacks],
    ).fit(module, datamodule=dm)
    return recorder


def constant_lr(lr: float = 1e-3) -> OptimConfig:
    return OptimConfig(lr=lr, warmup_steps=0, scheduler="constant")


def test_frozen_models_are_submodules_in_eval_mode_and_left_out_of_checkpoints() -> None:
    module = DPOModule(optim=constant_lr())
    module.configure_model()
    reference = module.reference_model
    assert reference is not None
    assert any(sub is reference for sub in module.modules()), (
        "the strategy must see (shard, cast) the reference"
    )
    module.train()  # what Lightning does at the start of fit
    assert not reference.training and all(not m.training for m in reference.modules())
    assert not any(p.requires_grad for p in reference.parameters())
    trained = {
        id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]
    }
    assert not trained & {id(p) for p in reference.parameters()}
    checkpoint: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith("frozen.") for k in checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)  # strict loading still finds every key
    module.load_state_dict(checkpoint["state_dict"], strict=True)


@pytest.mark.parametrize("variant", ["dpo_live", "dpo_precomputed", "kto"])
def test_zero3_reference_is_sharded_and_training_starts_where_single_process_starts(
    variant: str, pairs: str, unpaired: str, tmp_path: Any
) -> None:
    def make() -> tuple[pl.LightningModule, pl.LightningDataModule]:
        if variant == "kto":
            return KTOModule(optim=constant_lr()), datamodule(unpaired, "KTO")
        module = DPOModule(
            optim=constant_lr(),
            precompute_ref_log_probs=variant == "dpo_precomputed",
            ref_cache_dir=str(tmp_path / "cache" / str(len(os.listdir(tmp_path)))),
        )
        return module, datamodule(pairs, "HH-RLHF")

    single = fit(*make(), tmp_path / "single")
    module, dm = make()
    shards: dict[str, int] = {}

    class Inspect(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            ref = pl_module.frozen.get("reference")
            if ref is not None:
                params = list(ref.parameters())
                shards["ds"] = sum(hasattr(p, "ds_id") for p in params)
                shards["all"] = len(params)

    zero3 = fit(module, dm, tmp_path / "zero3", strategy=sharded_zero3(), callbacks=(Inspect(),))
    if variant != "dpo_precomputed":
        assert shards["ds"] == shards["all"] > 0, "the reference is partitioned like the policy"
    else:
        assert not shards, "the precomputed reference is released before training"
    if variant.startswith("dpo"):
        assert math.isclose(zero3.rows[0]["train/loss"], math.log(2), abs_tol=1e-5)
    for key in ("train/loss", "train/grad_norm"):
        assert math.isclose(zero3.rows[0][key], single.rows[0][key], rel_tol=1e-4, abs_tol=1e-6), key
    assert all(math.isfinite(v) for row in zero3.rows for v in row.values())


@pytest.mark.parametrize(
    "variant,strategy",
    [
        ("dpo_live", "auto"),
        ("dpo_precomputed", "auto"),
        ("kto", "auto"),
        ("dpo_live", "deepspeed_cpu_stage_2"),
    ],
)
def test_bf16_reference_computes_like_the_policy_so_step0_log_ratio_is_zero(
    variant: str, strategy: str, pairs: str, unpaired: str, tmp_path: Any
) -> None:
    if variant == "kto":
        module, dm = KTOModule(optim=constant_lr(), kl_estimate=False), datamodule(unpaired, "KTO")
        keys = ("train/rewards/desirable", "train/rewards/undesirable")
    else:
        module = DPOModule(
            optim=constant_lr(),
            precompute_ref_log_probs=variant == "dpo_precomputed",
            ref_cache_dir=str(tmp_path),
        )
        dm = datamodule(pairs, "HH-RLHF")
        keys = ("train/rewards/chosen", "train/rewards/rejected")
    rows = fit(module, dm, tmp_path, strategy=strategy, steps=1, precision="bf16-mixed").rows
    for key in keys:
        assert rows[0][key] == 0.0, f"{key} = {rows[0][key]}: reference and policy computed differently"


@pytest.mark.parametrize("strategy", ["auto", "deepspeed_cpu_stage_2"])
def test_bf16_ppo_first_rollout_kl_is_zero(strategy: str, repo_path: Any, tmp_path: Any) -> None:
    module = PPOModule(
        reward_functions=[RewardSpec("response_length")],
        generation=GenerationConfig(max_new_tokens=6),
        optim=constant_lr(),
    )
    dm = TextToTextDataModule(
        "tiny-qwen2",
        train={"path": repo_path("configs/data/alpaca_200.json"), "template": "Alpaca", "size": 8},
        max_length=48,
        batch_size=4,
    )
    rows = fit(module, dm, tmp_path, strategy=strategy, steps=1, precision="bf16-mixed").rows
    assert rows[0]["rollout/kl"] == 0.0


class TrainedLogits(pl.Callback):
    """Logits of a fixed input under the trained model, computed while the strategy still holds it."""

    def __init__(self) -> None:
        self.input_ids = torch.tensor([[5, 17, 99, 250, 1023, 7, 64, 300]])
        self.logits: torch.Tensor | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        was = model.training
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=self.input_ids).logits.float().clone()
        model.train(was)


@pytest.mark.parametrize("merge", [True, False])
def test_lora_zero3_export_holds_the_trained_weights(merge: bool, pairs: str, tmp_path: Any) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from aa_lightning.models.aliases import resolve_model_path

    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], merge_on_export=merge)
    module = SFTModule(lora=lora, optim=constant_lr(5e-2))
    logits = TrainedLogits()
    out = str(tmp_path / "hf")
    fit(
        module,
        datamodule(pairs, "HH-RLHF"),
        tmp_path,
        strategy=sharded_zero3(),
        steps=2,
        callbacks=(logits, HFExportCallback(dirpath=out)),
    )
    base_path = resolve_model_path("tiny-qwen2")
    if merge:
        exported = AutoModelForCausalLM.from_pretrained(out)
        assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    else:
        assert os.path.exists(os.path.join(out, "adapter_config.json"))
        exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), out)
    assert all(p.numel() > 0 for p in exported.parameters())
    base = AutoModelForCausalLM.from_pretrained(base_path)
    with torch.no_grad():
        reloaded = exported(input_ids=logits.input_ids).logits.float()
        untrained = base(input_ids=logits.input_ids).logits.float()
    assert (reloaded - untrained).abs().max() > 1e-4, "training must have changed the model"
    torch.testing.assert_close(reloaded, logits.logits, atol=1e-4, rtol=1e-4)


def test_lora_zero3_reference_equals_policy_at_step0(pairs: str, tmp_path: Any) -> None:
    """peft zero-initialises lora_B; under zero.Init that write must land in the shards (loss = log 2)."""
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    rows = fit(
        DPOModule(lora=lora, optim=constant_lr()),
        datamodule(pairs, "HH-RLHF"),
        tmp_path,
        strategy=sharded_zero3(),
        steps=1,
    ).rows
    assert math.isclose(rows[0]["train/loss"], math.log(2), abs_tol=1e-6)


def test_lora_reference_is_deterministic_while_the_policy_trains(pairs: str) -> None:
    """The adapters-off reference runs in eval mode (no dropout) even though the policy is in train mode."""
    module = DPOModule(lora=LoraConfig(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    module.configure_model()
    for sub in module.model.modules():
        if hasattr(sub, "attention_dropout"):
            sub.attention_dropout = 0.5  # a model trained with dropout
    module.train()
    dm = TextToTextDataModule(
        "tiny-qwen2",
        train={"path": pairs, "template": "HH-RLHF"},
        max_length=48,
        batch_size=4,
        kind="preference",
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    first = module.reference_log_probs_live(batch).sum
    second = module.reference_log_probs_live(batch).sum
    assert torch.equal(first, second)
    assert module.model.training, "the policy goes back to train mode"
    with torch.no_grad():  # the policy itself does drop out in train mode: the check above is not trivial
        a = module.policy_log_probs(batch).sum
        b = module.policy_log_probs(batch).sum
    assert not torch.equal(a, b)


def test_reference_cache_depends_on_precision(pairs: str, tmp_path: Any) -> None:
    """A table cached by an fp32 run is not reused by a bf16 run (its step-0 log-ratio would not be 0)."""
    cache = str(tmp_path / "cache")
    fit(
        DPOModule(precompute_ref_log_probs=True, ref_cache_dir=cache),
        datamodule(pairs, "HH-RLHF"),
        tmp_path,
        steps=1,
    )
    module = DPOModule(precompute_ref_log_probs=True, ref_cache_dir=cache, optim=constant_lr())
    rows = fit(module, datamodule(pairs, "HH-RLHF"), tmp_path, steps=1, precision="bf16-mixed").rows
    assert rows[0]["train/rewards/chosen"] == 0.0
    assert len(os.listdir(cache)) == 2


def test_reference_loaded_after_fit_matches_the_policy_device_and_dtype(pairs: str, tmp_path: Any) -> None:
    """fit releases the precomputed reference; a later test loads it again, cast like the (bf16) policy."""
    seen: list[torch.dtype] = []

    class Spy(DPOModule):
        def _compute_reference_table(self, loader: Any) -> Any:
            ref = self.frozen.get("reference")
            seen.append(next(ref.parameters()).dtype)
            return super()._compute_reference_table(loader)

    module = Spy(precompute_ref_log_probs=True, ref_cache_dir=str(tmp_path / "cache"), optim=constant_lr())
    dm = TextToTextDataModule(
        "tiny-qwen2",
        train={"path": pairs, "template": "HH-RLHF"},
        test={"path": pairs, "template": "HH-RLHF"},
        max_length=48,
        batch_size=4,
    )
    trainer = pl.Trainer(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        precision="bf16-true",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert module.reference_model is None  # released again after the test table
