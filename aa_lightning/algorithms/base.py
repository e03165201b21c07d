"""What every algorithm module shares: model building in ``configure_model``, optimizer, export, RNG.

Subclasses set ``data_kind`` (the sample kind they train on) and implement the steps. They never look at
what modality a batch holds: every top-level tensor of a batch except ``labels`` is a model input.

Hyperparameters, one way in every module: ``__init__`` stores each argument as a typed attribute (or the
object built from it; its default is stated once, in the signature) and the code reads that attribute, never
``self.hparams``: ``save_hyperparameters`` only records the arguments for checkpoints and loggers.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from aa_lightning.algorithms.config import GenerationConfig, LoraConfig, OptimConfig, as_config
from aa_lightning.algorithms.export import (
    lora_adapter_state_dict,
    merged_lora_state_dict,
    nonfinite_export_problem,
    plain_state_dict,
)
from aa_lightning.algorithms.frozen import FROZEN_PREFIX, FrozenModels, freeze
from aa_lightning.algorithms.gc_freeze import FreezeSetupObjects
from aa_lightning.algorithms.nonfinite import NonFiniteError, NonFiniteGuardMixin, NonFinitePolicy
from aa_lightning.algorithms.optim import build_optimizer, param_groups
from aa_lightning.algorithms.prediction import PredictionMixin
from aa_lightning.algorithms.zero3 import deepspeed_engine_of, initialise_lora_in_shards
from aa_lightning.models.loading import DTypeName, load_pretrained_models
from aa_lightning.models.unwrap import unwrap

__all__ = ["AlignModule", "NonFiniteError", "freeze"]


def frozen_module_names(model: nn.Module) -> list[str]:
    """Modules whose own parameters the model family froze before LoRA (a diffusion model's VAE and text
    encoder, Emu3's VQ-VAE): adapters there would be trainable parameters of a part that never trains (no
    gradient reaches it, or it does not run in the training forward: DDP stops on such "unused parameters")."""
    names = []
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if name and params and not any(p.requires_grad for p in params):
            names.append(name)
    return names


class AlignModule(NonFiniteGuardMixin, PredictionMixin, pl.LightningModule):
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
        on_nonfinite: what a NaN/inf loss or gradient norm does: ``error`` stops the run naming the step and
            the quantity; ``skip`` drops that optimizer step (its gradients are discarded) and counts it in
            ``train/skipped_steps`` (not under DeepSpeed, whose engine steps on its own). Either way a model
            with non-finite weights is never exported.
        generation: sampling settings of ``aa predict`` (:meth:`predict_step`); None decodes greedily. The RL
            modules take their own (``generation`` of their rollouts).
        padding_free: run training forwards of text models without pad positions (the rows of a batch packed
            into one sequence, attention per row: flash-attention varlen on GPU, exact per-row SDPA elsewhere;
            see :mod:`aa_lightning.models.packing`). Same loss and gradients, less work on padded batches.
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
        on_nonfinite: NonFinitePolicy = "error",
        generation: GenerationConfig | None = None,
        padding_free: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # records the init args of the whole subclass chain; code reads attributes
        if on_nonfinite not in ("error", "skip"):
            raise ValueError(f"on_nonfinite must be 'error' or 'skip', not {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        self.frozen = FrozenModels()  # reference / reward / cost models (see algorithms/frozen.py)
        self.model_name_or_path = model_name_or_path
        # not ``self.dtype``: LightningModule's read-only property (the dtype the parameters have now)
        self.load_dtype: DTypeName = dtype
        self.trust_remote_code = trust_remote_code
        self.gradient_checkpointing = gradient_checkpointing
        self.attn_implementation = attn_implementation
        self.padding_free = padding_free
        # typed once here: from YAML / the command line these arrive as dicts
        self.optim: OptimConfig = as_config(OptimConfig, optim, "optim")
        self.generation: GenerationConfig | None = (
            None if generation is None else as_config(GenerationConfig, generation, "generation")
        )
        self.lora: LoraConfig | None = None if lora is None else as_config(LoraConfig, lora, "lora")
        self.model: nn.Module | None = None
        self.tokenizer: Any = None
        self.processor: Any = None
        self._hf_deepspeed_config: Any = None  # set while ZeRO-3 loading is on (see enable_zero3_loading)

    # -- models ----------------------------------------------------------------------------------------
    def load_model(self, name_or_path: str | None = None, **kwargs: Any) -> tuple[nn.Module, Any, Any]:
        """``load_pretrained_models`` with this module's dtype/remote-code/attention settings."""
        self.enable_zero3_loading()
        model, tokenizer, processor = load_pretrained_models(
            name_or_path or self.model_name_or_path,
            dtype=self.load_dtype,
            trust_remote_code=self.trust_remote_code,
            attn_implementation=self.attn_implementation,
            **kwargs,
        )
        if self.padding_free:
            from aa_lightning.models.packing import enable_padding_free

            model = enable_padding_free(model)
        return model, tokenizer, processor

    def load_frozen(self, role: str, name_or_path: str | None = None, **kwargs: Any) -> nn.Module:
        """Load a frozen model for ``role`` into :attr:`frozen` (call from ``configure_model``: sharded under
        ZeRO-3 like the policy)."""
        path = name_or_path or self.model_name_or_path
        model, tokenizer, _ = self.load_model(path, **kwargs)
        return self.frozen.add(role, model, tokenizer, path)

    def setup_reference(self, ref_model_name_or_path: str | None = None) -> None:
        """The reference policy: ``ref_model_name_or_path``, else the initial policy loaded again from its path
        (never a deep copy: under ZeRO-3 the loaded policy is already partitioned), else, with LoRA, the
        policy with its adapters off."""
        if ref_model_name_or_path:
            self.load_frozen("reference", ref_model_name_or_path)
        elif self.lora is not None:
            self.frozen.use_policy_without_adapters("reference")
        else:
            self.load_frozen("reference")

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
        if self._hf_deepspeed_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()  # later from_pretrained calls in this process load normally
            self._hf_deepspeed_config = None

    def prepare_trainable(self, model: nn.Module) -> nn.Module:
        """Train mode, gradient checkpointing and LoRA, applied to a model that will be trained."""
        model.train()
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "config"):
                model.config.use_cache = False
        lora = self.lora
        if lora is not None:
            with warnings.catch_warnings():  # peft warns when none of the frozen modules was a target
                warnings.filterwarnings("ignore", message="You have passed exclude_modules")
                model = self._with_adapters(model, lora)
            initialise_lora_in_shards(model)  # under zero.Init peft's lora_B = 0 would miss the shards
        return model

    @staticmethod
    def _with_adapters(model: nn.Module, lora: LoraConfig) -> nn.Module:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        return get_peft_model(
            model,
            PeftLoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                exclude_modules=frozen_module_names(model) or None,
                # a score model's head is new: it trains in full next to the adapters
                modules_to_save=["score_head"] if hasattr(model, "score_head") else None,
            ),
        )

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
        manages its own gradient buffers; its engine computes the global gradient norm inside its step, so
        under DeepSpeed it is logged (and checked) here, before any callback can checkpoint the step.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        engine = self.deepspeed_engine()
        if engine is None:
            optimizer.zero_grad(set_to_none=True)
            return
        norm = engine.get_global_grad_norm()
        if norm is not None:
            norm = torch.as_tensor(norm, dtype=torch.float32)
            self.log("train/grad_norm", norm, batch_size=1)
            if not math.isfinite(float(norm)):
                self.handle_nonfinite("gradient norm", norm)

    def deepspeed_engine(self) -> Any:
        """The DeepSpeed engine when the run uses DeepSpeed, else None."""
        return deepspeed_engine_of(self._trainer)

    # -- non-finite guard ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Refuse, at start-up, combinations that cannot work (one clear line, never mid-run)."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        from aa_lightning.strategies import CPUDeepSpeedStrategy

        strategy = self.trainer.strategy
        if self.on_nonfinite == "skip" and isinstance(strategy, DeepSpeedStrategy):
            raise ValueError(
                "on_nonfinite: skip is not supported under DeepSpeed (its engine applies every step itself); "
                "use on_nonfinite: error"
            )
        if (
            isinstance(strategy, DeepSpeedStrategy)
            and not isinstance(strategy, CPUDeepSpeedStrategy)
            and self.trainer.accumulate_grad_batches > 1
        ):
            raise ValueError(
                "Lightning's DeepSpeedStrategy divides the loss by accumulate_grad_batches twice (Lightning and "
                "the engine); use aa_lightning.strategies.CPUDeepSpeedStrategy (GPUs too; the `aa` command does)"
            )

    def on_train_start(self) -> None:
        """DeepSpeed steps only at its own accumulation boundary: an epoch shorter than the window never
        steps, and a ``max_steps`` run would loop forever. Refuse that before the first batch."""
        accumulate = self.trainer.accumulate_grad_batches
        batches = self.trainer.num_training_batches
        if self.deepspeed_engine() is not None and accumulate > 1 and batches < accumulate:
            raise ValueError(
                f"accumulate_grad_batches={accumulate} but an epoch has only {batches} training batches: "
                "DeepSpeed would never take a step. Lower accumulate_grad_batches or the batch size"
            )

    def configure_callbacks(self) -> list[pl.Callback]:
        """Callbacks every algorithm needs: setup objects out of the GC's walks while training (steady steps)."""
        return [FreezeSetupObjects()]

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

    # -- export ----------------------------------------------------------------------------------------
    def export_model(self) -> nn.Module:
        """The model written by :meth:`export_pretrained` (the trained policy by default)."""
        return self.model

    def export_pretrained(self, save_directory: str) -> None:
        """Write the trained model, tokenizer and processor in Hugging Face format (``save_pretrained``).

        Every strategy takes the same path: the weights are copied to CPU first (ZeRO-3 shards gathered one
        submodule at a time; LoRA merged into a copy unless ``lora.merge_on_export`` is False, then the
        adapter alone is written), checked to be finite, and written by global rank 0 only.
        """
        model = unwrap(self.export_model())
        lora = self.lora
        is_peft = hasattr(model, "get_base_model") and hasattr(model, "peft_config")
        merge = lora is None or lora.merge_on_export
        writer = self._trainer is None or self.trainer.is_global_zero
        # every rank joins the gathers (collectives under ZeRO-3); only the writer keeps a CPU copy
        if is_peft and merge:
            state_dict, target = merged_lora_state_dict(model, keep=writer), model.get_base_model()
        elif is_peft:
            state_dict, target = lora_adapter_state_dict(model, keep=writer), model
        else:
            state_dict, target = plain_state_dict(model, keep=writer), model
        problem = nonfinite_export_problem(state_dict, save_directory) if writer else None
        if self._trainer is not None:
            problem = self.trainer.strategy.broadcast(problem, src=0)  # every rank stops, none waits
        if problem:
            raise NonFiniteError(problem)
        if not writer:
            return
        os.makedirs(save_directory, exist_ok=True)
        target.save_pretrained(save_directory, state_dict=state_dict)
        if os.path.isdir(os.path.join(save_directory, "tokenizer")):
            return  # a pipeline folder (diffusers) holds its own tokenizer
        for part in (self.processor, self.tokenizer):
            if part is not None:
                part.save_pretrained(save_directory)
                break
        if self.processor is None and self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)

    # -- exact resume: RNG states travel with the checkpoint -----------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):  # frozen models are reloaded from their paths, not stored again
            for key in [k for k in state if k.startswith(FROZEN_PREFIX)]:
                del state[key]
        # plain types and tensors only: Lightning reloads checkpoints with weights_only=True
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["aa_rng"] = {
            "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        weights = checkpoint.get("state_dict")
        if isinstance(
            weights, dict
        ):  # strict loading: the frozen models keep the weights they were built with
            for key, value in self.state_dict().items():
                if key.startswith(FROZEN_PREFIX) and key not in weights:
                    weights[key] = value
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
