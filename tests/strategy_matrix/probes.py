"""What a matrix cell measures while it runs: step-1/2 numbers, the model's outputs, and the HF export.

* :class:`StepRecorder` keeps, for every optimizer step, the loss that was back-propagated, the module's
  logged ``train/grad_norm`` and the harness's own measurement of the same norm (all gradients of the step,
  before clipping: ``on_before_optimizer_step`` runs before Lightning clips; the DeepSpeed engine's global
  norm; for RL modules outside DeepSpeed, which clip inside their own update, the per-optimizer norms they log,
  combined), plus every logged scalar.
* :class:`Probe` runs the trained model (the module's ``export_model()``) on two fixed training rows, in eval
  mode, and returns its logits (score models: per-token scores) at the non-pad positions. Under ZeRO-3 the
  forward gathers each layer, so every rank must call it together.
* :func:`check_export` scans the exported safetensors (no empty, no non-finite tensor), reloads the folder with
  transformers' ``from_pretrained`` (``ScoreModel.from_pretrained`` for score models) and compares its outputs
  with the trained weights' outputs. A score model's export is also loaded by plain transformers
  (``AutoModelForSequenceClassification``), whose one score per row must equal the trained end scores.
"""

from __future__ import annotations

import glob
import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from aa_lightning.algorithms.logprobs import explains_its_outputs
from aa_lightning.batch import model_inputs
from aa_lightning.models import ScoreModel
from aa_lightning.models.unwrap import unwrap


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def deepspeed_engine(trainer: pl.Trainer) -> Any:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = trainer.strategy
    return getattr(strategy, "deepspeed_engine", None) if isinstance(strategy, DeepSpeedStrategy) else None


class StepRecorder(pl.Callback):
    """Per optimizer step: back-propagated loss, logged and measured gradient norms, all logged scalars."""

    def __init__(self, probe: Probe | None = None) -> None:
        self.probe = probe
        self.initial: torch.Tensor | None = None
        self.steps: list[dict[str, Any]] = []
        self._squares = 0.0
        self._seen = False
        self._last_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is not None:
            self.initial = self.probe()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            self._squares += float(torch.nn.utils.get_total_norm(grads)) ** 2
            self._seen = True

    def measured_grad_norm(self, trainer: pl.Trainer, metrics: dict[str, float]) -> float | None:
        engine = deepspeed_engine(trainer)
        if engine is not None:
            norm = engine.get_global_grad_norm()
            return None if norm is None else float(norm)
        if not trainer.lightning_module.automatic_optimization:
            per_optimizer = [
                v for k, v in metrics.items() if k.endswith("_grad_norm") and k != "train/grad_norm"
            ]
            return math.hypot(*per_optimizer) if per_optimizer else None
        return math.sqrt(self._squares) if self._seen else None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not pl_module.automatic_optimization and trainer.global_step == self._last_step:
            return  # a manual-optimization batch that did not step (e.g. one more dynamic-sampling round)
        self._last_step = trainer.global_step
        metrics = scalar_metrics(trainer.callback_metrics)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.steps.append(
            {
                "global_step": trainer.global_step,
                "loss": float(loss) if isinstance(loss, torch.Tensor) else None,
                "grad_norm_logged": metrics.get("train/grad_norm"),
                "grad_norm_measured": self.measured_grad_norm(trainer, metrics),
                "metrics": metrics,
            }
        )
        self._squares, self._seen = 0.0, False


def base_model(model: nn.Module) -> nn.Module:
    """The transformers (or ScoreModel) model under DeepSpeed/DDP/peft wrappers."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_score_model(model: nn.Module) -> bool:
    return isinstance(base_model(model), ScoreModel)


class Probe:
    """Outputs of the module's exported model on two fixed training rows (non-pad positions, float32, CPU)."""

    def __init__(self, module: pl.LightningModule, datamodule: pl.LightningDataModule, rows: int = 2) -> None:
        self.module = module
        self.datamodule = datamodule
        self.rows = rows
        self._inputs: dict[str, torch.Tensor] | None = None

    def model(self) -> nn.Module:
        return self.module.export_model()

    def inputs(self) -> dict[str, torch.Tensor]:
        """Collated like training batches, from the first rows of the (encoded) training split."""
        if self._inputs is None:
            dm = self.datamodule
            data = dm.datasets["train"]
            batch = dm.build_collator(dm.kind)([data[i] for i in range(min(self.rows, len(data)))])
            self._inputs = {k: v.to(self.module.device) for k, v in model_inputs(batch, self.model()).items()}
        return self._inputs

    def __call__(self) -> torch.Tensor:
        return outputs_at_tokens(self.model(), self.inputs())


@torch.no_grad()
def outputs_at_tokens(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        if explains_its_outputs(model):  # a diffusion model: its per-row score at the rows' fixed noise seeds
            return model(**inputs).sum.float().cpu()
        if is_score_model(model):
            out = model(**inputs).scores
        else:
            out = model(**inputs, use_cache=False).logits
    finally:
        model.train(was_training)
    return out[inputs["attention_mask"].bool()].float().cpu()


def digest(values: torch.Tensor) -> dict[str, Any]:
    """A few numbers that differ when two ranks hold different weights."""
    v = values.double()
    return {"sum": float(v.sum()), "abs_sum": float(v.abs().sum()), "head": v.flatten()[:8].tolist()}


def scan_safetensors(folder: str, report: dict[str, Any]) -> None:
    """Counts of tensors, empty tensors and non-finite tensors in every ``*.safetensors`` file of ``folder``."""
    from safetensors import safe_open

    files = sorted(
        glob.glob(os.path.join(folder, "**", "*.safetensors"), recursive=True)
    )  # pipelines: per part
    tensors, empty, nonfinite = 0, [], []
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                tensors += 1
                if tensor.numel() == 0:
                    empty.append(key)
                elif tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    nonfinite.append(key)
    report.update(
        files=[os.path.basename(p) for p in files],
        n_tensors=tensors,
        n_empty=len(empty),
        empty=empty[:5],
        n_nonfinite=len(nonfinite),
        nonfinite=nonfinite[:5],
    )


def check_export(folder: str, trained: torch.Tensor, probe: Probe, report: dict[str, Any]) -> None:
    """Fill ``report`` with the scan of the export, then reload it and compare outputs (may raise on reload)."""
    report["exists"] = os.path.isdir(folder)
    scan_safetensors(folder, report)
    score = is_score_model(probe.model())
    if explains_its_outputs(probe.model()):  # a diffusers pipeline folder: the model class loads it whole
        reloaded = type(base_model(probe.model())).from_pretrained(folder)
        info: dict[str, Any] = {}
    elif score:
        from transformers import AutoModelForSequenceClassification

        reloaded: nn.Module = ScoreModel.from_pretrained(folder)
        info = {}
        # families transformers has no *ForSequenceClassification for keep the backbone + score_head format
        if not os.path.exists(os.path.join(folder, "score_head.safetensors")):
            seqcls, info = AutoModelForSequenceClassification.from_pretrained(
                folder, output_loading_info=True
            )
            check_seqcls_scores(seqcls, trained, {k: v.cpu() for k, v in probe.inputs().items()}, report)
    else:
        model_class = type(base_model(probe.model()))
        reloaded, info = model_class.from_pretrained(folder, output_loading_info=True)
    report["reload_class"] = type(reloaded).__name__
    report["dtype"] = str(next(reloaded.parameters()).dtype).removeprefix("torch.")
    report["trained_dtype"] = str(next(probe.model().parameters()).dtype).removeprefix("torch.")
    report["missing_keys"] = sorted(info.get("missing_keys", []))[:10]
    report["unexpected_keys"] = sorted(info.get("unexpected_keys", []))[:10]
    report["mismatched_keys"] = [str(k) for k in info.get("mismatched_keys", [])][:10]
    inputs = {k: v.cpu() for k, v in probe.inputs().items()}
    got = outputs_at_tokens(reloaded, inputs)
    report["shape"] = list(got.shape)
    report["max_abs_trained"] = float(trained.abs().max())
    report["max_abs_diff"] = float((got - trained).abs().max()) if got.shape == trained.shape else math.inf


@torch.no_grad()
def check_seqcls_scores(
    seqcls: nn.Module, trained: torch.Tensor, inputs: dict[str, torch.Tensor], report: dict[str, Any]
) -> None:
    """``seqcls_*``: the plain-transformers reload's one score per row against the trained end scores.

    ``trained`` holds the trained model's scores at the non-pad positions, row after row (see
    :func:`outputs_at_tokens`), so a row's end score is the last of its own (no second, collective forward).
    """
    counts = inputs["attention_mask"].sum(dim=1)
    trained_end = trained[torch.cumsum(counts, 0) - 1]
    seqcls.eval()
    got = seqcls(**inputs).logits.float().squeeze(-1)
    report["seqcls_class"] = type(seqcls).__name__
    report["seqcls_max_abs_trained"] = float(trained_end.abs().max())
    report["seqcls_max_abs_diff"] = (
        float((got - trained_end).abs().max()) if got.shape == trained_end.shape else math.inf
    )


def start_from_named_adapters(module: pl.LightningModule) -> None:
    """After ``configure_model``, set every LoRA ``A`` matrix to a draw seeded by its parameter name.

    peft draws ``lora_A`` once the layer exists; under ``deepspeed.zero.Init`` the layer is already partitioned,
    so that draw hits an empty shard (a no-op) and the layer keeps ``nn.Linear``'s own draw (the same law,
    kaiming-uniform with ``a=sqrt(5)``, but other numbers). ``lora_B`` is 0 either way. The LoRA columns would
    then start from different adapters and their first steps could not be compared; this gives every column
    the same ones, before the optimizer (and DeepSpeed's fp32 master copy) is built.
    """
    import contextlib
    import zlib

    configure = module.configure_model

    def configure_then_set_adapters() -> None:
        configure()
        params = [(n, p) for n, p in module.named_parameters() if ".lora_A." in n]
        gather: contextlib.AbstractContextManager = contextlib.nullcontext()
        if any(hasattr(p, "ds_id") for _, p in params):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0)
        with gather, torch.no_grad():
            for name, param in params:
                generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                bound = 1.0 / math.sqrt(param.shape[1])
                draw = torch.empty(param.shape, dtype=torch.float32).uniform_(
                    -bound, bound, generator=generator
                )
                param.copy_(draw.to(param.dtype))

    module.configure_model = configure_then_set_adapters  # type: ignore[method-assign]
