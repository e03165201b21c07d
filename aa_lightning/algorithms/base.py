"""What every algorithm module shares: model building in ``configure_model``, optimizer, export, RNG.

Subclasses set ``data_kind`` (the sample kind they train on) and implement the steps. They never look at
what modality a batch holds: every top-level tensor of a batch except ``labels`` is a model input.
"""

from __future__ import annotations

import os
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from aa_lightning.algorithms.config import LoraConfig, OptimConfig
from aa_lightning.algorithms.optim import build_optimizer, param_groups
from aa_lightning.models.loading import DTypeName, load_pretrained_models

NON_MODEL_KEYS = frozenset({"labels"})


def model_inputs(batch: dict[str, Any], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The model's forward inputs from a batch: every top-level tensor except the labels.

    A registered model class can map a batch itself by defining ``infer_batch(batch)`` (align-anything's
    hook for models without a processor).
    """
    target = getattr(model, "module", model)
    infer = getattr(target, "infer_batch", None)
    if callable(infer):
        return infer(batch)
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in NON_MODEL_KEYS}


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DeepSpeed/DDP/peft wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Frozen models (reference, reward) stay in eval mode with no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


class AlignModule(pl.LightningModule):
    """Base of every algorithm module.

    Args:
        model_name_or_path: the model to train: a local folder, a hub name or an alias
            (``smollm2-135m-instruct``, ``tiny-llama``, ``tiny-qwen2``, ...).
        dtype: parameter dtype when loading (``auto`` keeps the checkpoint's).
        trust_remote_code: run code shipped with a checkpoint (off unless you turn it on).
        optim: optimizer and learning-rate schedule.
        gradient_checkpointing: recompute activations in backward to save memory.
        lora: train LoRA adapters (peft) instead of all weights.
        attn_implementation: e.g. ``sdpa``, ``eager``, ``flash_attention_2``.
    """

    data_kind: str = "supervised"

    def __init__(
        self,
        model_name_or_path: str = "tiny-qwen2",
        dtype: DTypeName = "auto",
        trust_remote_code: bool = False,
        optim: OptimConfig | None = None,
        gradient_checkpointing: bool = False,
        lora: LoraConfig | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # collects the init args of the whole subclass chain
        self.model_name_or_path = model_name_or_path
        self.optim = optim or OptimConfig()
        self.model: nn.Module | None = None
        self.tokenizer: Any = None
        self.processor: Any = None

    # -- models ----------------------------------------------------------------------------------------
    def load_model(self, name_or_path: str | None = None, **kwargs: Any) -> tuple[nn.Module, Any, Any]:
        """``load_pretrained_models`` with this module's dtype/remote-code/attention settings."""
        hp = self.hparams
        self.enable_zero3_loading()
        return load_pretrained_models(
            name_or_path or self.model_name_or_path,
            dtype=hp.get("dtype", "auto"),
            trust_remote_code=hp.get("trust_remote_code", False),
            attn_implementation=hp.get("attn_implementation"),
            **kwargs,
        )

    def enable_zero3_loading(self) -> None:
        """Under ZeRO-3, tell transformers so ``from_pretrained`` loads weights into partitioned parameters.

        ``configure_model`` already runs inside ``deepspeed.zero.Init`` (parameters are sharded as they are
        created); transformers then gathers each layer while it copies the checkpoint in.
        """
        strategy = self._trainer.strategy if self._trainer is not None else None
        config = getattr(strategy, "config", None)
        if not isinstance(config, dict) or config.get("zero_optimization", {}).get("stage") != 3:
            return
        from transformers.integrations import HfDeepSpeedConfig

        self._hf_deepspeed_config = HfDeepSpeedConfig(config)  # transformers keeps only a weak reference

    def teardown(self, stage: str) -> None:
        if getattr(self, "_hf_deepspeed_config", None) is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()  # later from_pretrained calls in this process load normally
            self._hf_deepspeed_config = None

    def prepare_trainable(self, model: nn.Module) -> nn.Module:
        """Train mode, gradient checkpointing and LoRA, applied to a model that will be trained."""
        model.train()
        if self.hparams.get("gradient_checkpointing"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "config"):
                model.config.use_cache = False
        lora: LoraConfig | None = self.hparams.get("lora")
        if lora is not None:
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model

            if isinstance(lora, dict):
                lora = LoraConfig(**lora)
            model = get_peft_model(
                model,
                PeftLoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=lora.target_modules,
                ),
            )
        return model

    def trained_modules(self) -> list[nn.Module]:
        return [self.model]

    # -- optimization ----------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        groups = param_groups(self.trained_modules(), self.optim.weight_decay)
        optimizer, scheduler = build_optimizer(groups, self.optim, self.total_optimizer_steps())
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """Step, then free the gradients at once (Lightning would keep them alive through the next forward).

        Saves one gradient-sized buffer at the activation peak (540 MB for a 135M model in fp32); gradient
        accumulation is unaffected since this runs only at the end of an accumulation window. DeepSpeed
        manages its own gradient buffers.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if not isinstance(self.trainer.strategy, DeepSpeedStrategy):
            optimizer.zero_grad(set_to_none=True)

    def log_learning_rates(self) -> None:
        """``train/lr`` (and ``train/lr_group{i}`` for further parameter groups): plain floats, no sync."""
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        if not optimizers:
            return
        for i, group in enumerate(optimizers[0].param_groups):
            self.log("train/lr" if i == 0 else f"train/lr_group{i}", float(group["lr"]), batch_size=1)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log_learning_rates()

    def total_optimizer_steps(self) -> int:
        try:
            return int(self.trainer.estimated_stepping_batches)
        except Exception:  # no trainer (notebooks) or an infinite loader
            return 1000

    # -- prediction: generate answers for prompt-only batches -----------------------------------------
    def generation_model(self) -> nn.Module:
        """The causal LM that generates (the policy)."""
        return self.model

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Answers to the prompts of a prompt-only batch, as dicts ``{prompt, response, meta}``."""
        from aa_lightning.algorithms.config import GenerationConfig

        gen: GenerationConfig = getattr(self, "generation", None) or GenerationConfig(do_sample=False)
        model = unwrap(self.generation_model())
        inputs = model_inputs(batch, model)
        out = model.generate(
            **inputs,
            max_new_tokens=gen.max_new_tokens,
            do_sample=gen.do_sample,
            temperature=gen.temperature if gen.do_sample else None,
            top_p=gen.top_p if gen.do_sample else None,
            top_k=gen.top_k if gen.do_sample else None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        responses = self.tokenizer.batch_decode(
            out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        prompts = self.tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=True)
        metas = batch.get("meta") or [{} for _ in responses]
        return [{"prompt": p, "response": r, "meta": m} for p, r, m in zip(prompts, responses, metas)]

    # -- export ----------------------------------------------------------------------------------------
    def export_model(self) -> nn.Module:
        """The model written by :meth:`export_pretrained` (the trained policy by default)."""
        return self.model

    def export_pretrained(self, save_directory: str) -> None:
        """Write the trained model, tokenizer and processor in Hugging Face format (``save_pretrained``).

        Under ZeRO-3 the sharded parameters are gathered first; only global rank 0 writes.
        """
        model = unwrap(self.export_model())
        state_dict = None
        strategy = self.trainer.strategy if self._trainer is not None else None
        engine = getattr(strategy, "deepspeed_engine", None) if strategy is not None else None
        if engine is not None and engine.zero_optimization_stage() == 3:
            state_dict = gathered_state_dict(self.export_model())
        if self._trainer is not None and not self.trainer.is_global_zero:
            return
        lora: LoraConfig | None = self.hparams.get("lora")
        os.makedirs(save_directory, exist_ok=True)
        if lora is not None and getattr(lora, "merge_on_export", True) and hasattr(model, "merge_adapter"):
            save_merged_lora(model, save_directory)
        elif state_dict is not None:
            model.save_pretrained(save_directory, state_dict=state_dict)
        else:
            model.save_pretrained(save_directory)
        for part in (self.processor, self.tokenizer):
            if part is not None:
                part.save_pretrained(save_directory)
                break
        if self.processor is None and self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)

    # -- exact resume: RNG states travel with the checkpoint -----------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # plain types and tensors only: Lightning reloads checkpoints with weights_only=True
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["aa_rng"] = {
            "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("aa_rng")
        if not state:
            return
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def save_merged_lora(peft_model: nn.Module, save_directory: str) -> None:
    """Save base weights with the adapters merged in, leaving the training model unchanged."""
    peft_model.merge_adapter()
    try:
        base = peft_model.get_base_model()
        state = {
            k.replace(".base_layer.", "."): v.detach().cpu().clone()
            for k, v in base.state_dict().items()
            if "lora_" not in k
        }
        base.save_pretrained(save_directory, state_dict=state)
    finally:
        peft_model.unmerge_adapter()


def gathered_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict of a ZeRO-3 partitioned module, gathered one submodule at a time (CPU copies)."""
    import deepspeed

    module = unwrap(module)
    out: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules():
        params = list(sub.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for name, tensor in list(sub.named_parameters(recurse=False)) + list(
                sub.named_buffers(recurse=False)
            ):
                out[f"{prefix}.{name}" if prefix else name] = tensor.detach().cpu().clone()
    return out
