"""The DPO family: DPO (sigmoid / IPO / hinge / cDPO) against a reference model, and reference-free SimPO / ORPO.

How the methods are split into modules (and why):

* :class:`DPOModule` holds everything that needs a *reference* policy: the frozen copy (or a separate
  checkpoint, or the LoRA base with adapters switched off) and the optional one-off precomputation of
  reference log-probs cached in memory and on disk. Its ``loss_type`` picks sigmoid (DPO; cDPO with
  ``label_smoothing``), ``ipo`` (length-normalised log-ratios) or ``hinge``; the losses share every input,
  so one module with a switch is simpler than three classes. ``preference_loss`` is the single override
  point for a custom loss (see ``notebooks/custom_preference_loss.ipynb``).
* :class:`ReferenceFreeModule` holds the methods that need no reference at all: ``loss_type`` ``simpo``
  (mean log-probs, ``beta``, ``gamma``) or ``orpo`` (chosen NLL + ``orpo_lambda`` x odds-ratio loss). Keeping
  them out of :class:`DPOModule` means no reference knobs that would be silently ignored, and no second
  model in memory.
* KTO trains on *unpaired* supervised rows, so it is its own module (:mod:`.kto`).

All of them score chosen and rejected in ONE forward: preference batches hold the ``B`` chosen rows
followed by the ``B`` rejected rows (see :mod:`aa_lightning.data.collators`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from aa_lightning.algorithms.base import AlignModule, model_inputs, unwrap
from aa_lightning.algorithms.eval_metrics import UniqueSampleSums, sample_indices
from aa_lightning.algorithms.logprobs import SequenceLogProbs, causal_lm_log_probs
from aa_lightning.algorithms.losses import PreferenceLossOutput, dpo_loss, orpo_loss, simpo_loss
from aa_lightning.algorithms.token_mean import StepTokenMean
from aa_lightning.batch import STEP_CHOSEN_LABEL_TOKENS
from aa_lightning.models.aliases import resolve_model_path

log = logging.getLogger(__name__)

__all__ = [
    "DPOModule",
    "PREFERENCE_METRICS",
    "ReferenceFreeModule",
    "ReferencePolicyModule",
    "StageMeans",
    "StepStatsModule",
    "pair_stats",
    "split_pairs",
]

PREFERENCE_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------
# Shared step/metric plumbing
# --------------------------------------------------------------------------------------------------


class StageMeans(nn.Module):
    """Per-example means of named statistics over a whole val/test epoch, exact over all ranks.

    A statistic with one value per row of the batch is kept per sample (:class:`UniqueSampleSums`), so the
    rows a distributed sampler hands out twice to even out the ranks count once; other statistics (a subset
    of the rows, a batch-level scalar) are pooled as they come. Every rank updates every statistic each batch
    (possibly with nothing), so all ranks take part in the same collectives at the epoch's end. A statistic
    with no value in an epoch (e.g. ORPO's ``or_loss`` in a SimPO run) is simply not reported.
    """

    def __init__(self, names: Iterable[str], stages: Iterable[str] = ("val", "test")) -> None:
        super().__init__()
        self.names = list(names)
        self.metrics = nn.ModuleDict(
            {
                stage: nn.ModuleDict({self._key(n): UniqueSampleSums(["sum", "count"]) for n in self.names})
                for stage in stages
            }
        )

    @staticmethod
    def _key(name: str) -> str:
        return name.replace("/", "__")

    def update(self, stage: str, stats: dict[str, torch.Tensor], index: torch.Tensor | None = None) -> None:
        """``index``: the dataset index of each row of the batch (``sample_indices``); None: no dedup."""
        for name in self.names:
            metric = self.metrics[stage][self._key(name)]
            value = stats.get(name)
            value = value.detach().double().reshape(-1) if value is not None else torch.zeros(0)
            value = value.to(metric.device)
            if index is not None and value.numel() == index.numel():
                metric.update(index, {"sum": value, "count": torch.ones_like(value)})
            else:
                rows = torch.full((1,), -1, dtype=torch.long, device=metric.device)
                count = torch.full((1,), float(value.numel()), dtype=torch.float64, device=metric.device)
                metric.update(rows, {"sum": value.sum().reshape(1), "count": count})

    def compute(self, stage: str) -> dict[str, torch.Tensor]:
        """Means of the statistics updated this epoch; resets them."""
        out: dict[str, torch.Tensor] = {}
        for name in self.names:
            metric = self.metrics[stage][self._key(name)]
            if metric.update_called:
                sums = metric.compute()
                if sums["count"] > 0:
                    out[name] = (sums["sum"] / sums["count"]).float()
            # fresh states must be normal tensors, not inference tensors: `trainer.validate` runs under
            # inference_mode while validation inside `fit` runs under no_grad and updates them in place
            with torch.inference_mode(False):
                metric.reset()
        return out


class StepStatsModule(AlignModule):
    """A module whose every step is ``compute_loss(batch, stage) -> (loss, stats)``.

    ``stats`` maps names to per-example (or scalar) detached tensors. Training logs their batch means as
    ``train/<name>`` each step; validation and test log ``val/<name>`` / ``test/<name>`` as means over the
    whole held-out set (so ``aa validate`` reports exact set-level numbers, not a mean of batch means).
    Subclasses list their statistic names in ``metric_names``.
    """

    metric_names: tuple[str, ...] = ("loss",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eval_means = StageMeans(self.metric_names)

    def compute_loss(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    @staticmethod
    def batch_size_of(batch: dict[str, Any]) -> int:
        extra = batch.get("extra") or {}
        if "sample_index" in extra:
            return int(extra["sample_index"].shape[0])
        return int(batch["input_ids"].shape[0])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, stats = self.compute_loss(batch, "train")
        size = self.batch_size_of(batch)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        means = {f"train/{k}": v.float().mean() for k, v in stats.items() if k != "loss" and v.numel()}
        self.log_dict(means, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        _, stats = self.compute_loss(batch, "val" if not dataloader_idx else f"val_{dataloader_idx}")
        self.eval_means.update("val", stats, sample_indices(batch, self.batch_size_of(batch)))

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        _, stats = self.compute_loss(batch, "test" if not dataloader_idx else f"test_{dataloader_idx}")
        self.eval_means.update("test", stats, sample_indices(batch, self.batch_size_of(batch)))

    def epoch_stats(self, stage: str) -> dict[str, torch.Tensor]:
        """The set-level statistics logged at the end of a val/test epoch (subclasses may add derived ones)."""
        return self.eval_means.compute(stage)

    def on_validation_epoch_end(self) -> None:
        for name, value in self.epoch_stats("val").items():
            self.log(f"val/{name}", value, prog_bar=name == "loss")

    def on_test_epoch_end(self) -> None:
        self.log_dict({f"test/{k}": v for k, v in self.epoch_stats("test").items()})


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) halves of a ``(2B, ...)`` tensor from a preference batch."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def pair_stats(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    losses: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The standard preference statistics (names as TRL logs them), all detached."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "loss": losses.detach().float(),
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps.detach().float(),
        "logps/rejected": rejected_logps.detach().float(),
    }


class PolicyModule(StepStatsModule):
    """A causal-LM policy plus the one-forward sequence log-probs every preference method needs."""

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model, self.tokenizer, self.processor = self.load_model()
        self.model = self.prepare_trainable(model)
        self.configure_reference()

    def configure_reference(self) -> None:
        """Hook run in ``configure_model`` after the policy is built (no reference by default)."""

    def policy_log_probs(self, batch: dict[str, Any]) -> SequenceLogProbs:
        """Log-probs of every row's labelled tokens under the policy, in one forward over all rows."""
        # the LM head runs only on scored positions (prompt and padding never reach the vocabulary)
        return causal_lm_log_probs(self.model, model_inputs(batch, self.model), batch["labels"])


# --------------------------------------------------------------------------------------------------
# Reference models
# --------------------------------------------------------------------------------------------------


class ReferencePolicyModule(PolicyModule):
    """A policy trained against a frozen reference policy (DPO, KTO).

    The reference lives in :attr:`frozen` (see :mod:`aa_lightning.algorithms.frozen`): loaded from
    ``ref_model_name_or_path`` or again from the policy's own path in ``configure_model`` (so it is sharded,
    cast and placed exactly like the policy under every strategy), or, with LoRA, the policy itself with its
    adapters switched off (no second copy of the weights).
    """

    def __init__(self, *args: Any, ref_model_name_or_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ref_model_name_or_path = ref_model_name_or_path

    def configure_reference(self) -> None:
        if "reference" not in self.frozen:
            self.setup_reference(self.ref_model_name_or_path)

    @property
    def reference_model(self) -> nn.Module | None:
        """The stored reference model (None when there is none, or when LoRA's adapters-off policy serves)."""
        return self.frozen.get("reference")

    def reference_log_probs_live(self, batch: dict[str, Any]) -> SequenceLogProbs:
        """Log-probs of the batch's labelled tokens under the reference, in one no-grad forward."""
        with self.frozen.running("reference", self.model) as ref:
            return causal_lm_log_probs(ref, model_inputs(batch, ref), batch["labels"])


def _label_counts(labels: torch.Tensor) -> torch.Tensor:
    """Number of scored (shifted) label positions per row, as ``sequence_log_probs`` counts them."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=-1)


def model_identity(name_or_path: str) -> dict[str, Any]:
    """What identifies a checkpoint for cache keys: its resolved path, config and weight files' size/mtime."""
    path = resolve_model_path(name_or_path)
    ident: dict[str, Any] = {"path": os.path.abspath(path) if os.path.exists(path) else path}
    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        if os.path.exists(config):
            with open(config) as f:
                ident["config"] = f.read()
        ident["weights"] = sorted(
            (name, os.path.getsize(os.path.join(path, name)), int(os.path.getmtime(os.path.join(path, name))))
            for name in os.listdir(path)
            if name.endswith((".safetensors", ".bin", ".pt"))
        )
    return ident


def dataset_fingerprint(dataset: Any) -> str:
    """A ``datasets.Dataset`` fingerprint (deterministic over the encoding settings), else a content hash."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint:
        return str(fingerprint)
    digest = hashlib.sha256(str(len(dataset)).encode())
    for i in range(len(dataset)):
        digest.update(repr(dataset[i]).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------------


class DPOModule(ReferencePolicyModule):
    """Direct Preference Optimisation against a frozen reference, with IPO / hinge / cDPO variants.

    Args:
        beta: KL strength (IPO: ``tau``).
        loss_type: ``sigmoid`` (DPO), ``ipo`` (squared loss on length-normalised log-ratios: mean
            log-probs), ``hinge`` (SLiC).
        label_smoothing: cDPO's label-flip probability (``sigmoid`` only).
        ref_model_name_or_path: a separate reference checkpoint; default: the initial policy.
        precompute_ref_log_probs: compute the reference log-probs of every train/val sample once before
            training (cached in memory keyed by ``sample_index`` and on disk keyed by a fingerprint of the
            reference model and the encoded data), then drop the reference model: training then holds only
            the policy. A restart finds the file and recomputes nothing.
        ref_cache_dir: where the reference log-prob files go; default ``<default_root_dir>/ref_logps``.

    Logs ``{train,val}/loss``, ``rewards/{chosen,rejected,accuracies,margins}``, ``logps/{chosen,rejected}``
    (sums over response tokens). To try a new loss, subclass and override :meth:`preference_loss`.
    """

    data_kind = "preference"
    metric_names = PREFERENCE_METRICS

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
        label_smoothing: float = 0.0,
        ref_model_name_or_path: str | None = None,
        precompute_ref_log_probs: bool = False,
        ref_cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, ref_model_name_or_path=ref_model_name_or_path, **kwargs)
        if loss_type not in ("sigmoid", "ipo", "hinge"):
            raise ValueError(f"unknown loss_type {loss_type!r}; expected 'sigmoid', 'ipo' or 'hinge'")
        if label_smoothing and loss_type != "sigmoid":
            raise ValueError("label_smoothing (cDPO) applies to loss_type 'sigmoid' only")
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.precompute_ref_log_probs = precompute_ref_log_probs
        self.ref_cache_dir = ref_cache_dir
        # split -> {"sum": (N, 2), "mean": (N, 2), "count": (N, 2)} on CPU; count -1 = not computed
        self.ref_cache: dict[str, dict[str, torch.Tensor]] = {}

    # -- the loss (override point) ---------------------------------------------------------------------
    @property
    def uses_mean_log_probs(self) -> bool:
        """IPO compares length-normalised (per-token mean) log-ratios; the others compare sums."""
        return self.loss_type == "ipo"

    def preference_loss(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor,
        ref_rejected_logps: torch.Tensor,
    ) -> PreferenceLossOutput:
        """``(B,)`` log-probs in, loss + implicit rewards out. Override to try another preference loss."""
        return dpo_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
        )

    def compute_loss(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = self.policy_log_probs(batch)
        ref_sum, ref_mean = self.reference_log_probs(batch, stage)
        if self.uses_mean_log_probs:
            policy_logps, ref_logps = policy.mean, ref_mean
        else:
            policy_logps, ref_logps = policy.sum, ref_sum
        out = self.preference_loss(*split_pairs(policy_logps), *split_pairs(ref_logps.to(policy_logps)))
        chosen_logps, rejected_logps = split_pairs(policy.sum)
        return out.loss, pair_stats(
            out.chosen_rewards, out.rejected_rewards, chosen_logps, rejected_logps, out.losses
        )

    # -- reference: live model, or only while its log-probs are precomputed ---------------------------
    def configure_reference(self) -> None:
        """Live reference: always. Precomputed: built here only when some needed table is not on disk yet,
        so under ZeRO-3 it is sharded like the policy; it is released once the tables are filled."""
        if (
            self.precompute_ref_log_probs
            and self._trainer is not None
            and self.trainer.datamodule is not None
        ):
            if not self._missing_reference_tables(self._precompute_splits()):
                return
        super().configure_reference()

    def _precompute_splits(self) -> tuple[str, ...]:
        fn = str(getattr(self.trainer.state.fn, "value", self.trainer.state.fn))
        return {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(fn, ())

    def _missing_reference_tables(self, splits: Iterable[str]) -> list[str]:
        loaders = self._datamodule_loaders(splits)
        return [
            split
            for split, loader in loaders.items()
            if split not in self.ref_cache
            and not os.path.exists(self.reference_cache_file(split, loader.dataset))
        ]

    def reference_log_probs(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(2B,)`` reference log-prob sums and means of the batch rows (live model or cache)."""
        if not self.precompute_ref_log_probs:
            ref = self.reference_log_probs_live(batch)
            return ref.sum, ref.mean
        table = self.ref_cache.get(stage)
        index = (batch.get("extra") or {}).get("sample_index")
        if index is None:
            raise RuntimeError(
                "precompute_ref_log_probs needs batch['extra']['sample_index'] (the data layer adds it)"
            )
        if table is None:
            raise RuntimeError(
                f"no precomputed reference log-probs for the {stage!r} split; they are computed at the start of "
                "fit/validate/test from the datamodule's loaders"
            )
        index = index.cpu()
        if int(index.max()) >= table["count"].shape[0]:
            raise RuntimeError(
                f"sample_index {int(index.max())} is beyond the cached {stage!r} reference log-probs"
            )
        counts = table["count"][index]  # (B, 2)
        if (counts < 0).any():
            raise RuntimeError(f"reference log-probs missing for some {stage!r} samples")
        expected = torch.cat([counts[:, 0], counts[:, 1]])
        if not torch.equal(expected, _label_counts(batch["labels"]).cpu()):
            raise RuntimeError(
                f"the cached reference log-probs of the {stage!r} split do not match this batch's tokens "
                "(stale cache: delete the ref_logps files or change ref_cache_dir)"
            )
        device = batch["labels"].device
        rows = [table["sum"][index], table["mean"][index]]
        return tuple(torch.cat([r[:, 0], r[:, 1]]).to(device) for r in rows)  # type: ignore[return-value]

    # -- reference: precomputed ------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.precompute_ref_log_probs:
            self.precompute_reference(self._datamodule_loaders(("train", "val")))

    def on_validation_start(self) -> None:
        if self.precompute_ref_log_probs and self.trainer.state.fn != "fit":
            self.precompute_reference(self._datamodule_loaders(("val",)))

    def on_test_start(self) -> None:
        if self.precompute_ref_log_probs:
            self.precompute_reference(self._datamodule_loaders(("test",)))

    def _datamodule_loaders(self, splits: Iterable[str]) -> dict[str, DataLoader]:
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise RuntimeError(
                "precompute_ref_log_probs needs a LightningDataModule (trainer.fit(module, datamodule=...))"
            )
        loaders: dict[str, DataLoader] = {}
        for split in splits:
            made = getattr(datamodule, f"{split}_dataloader")()
            made = list(made) if isinstance(made, (list, tuple)) else [made]
            for i, loader in enumerate(made):
                loaders[split if i == 0 else f"{split}_{i}"] = loader
        return loaders

    def reference_cache_file(self, split: str, dataset: Any) -> str:
        """``<ref_cache_dir>/<fingerprint>.pt``: fingerprint of reference checkpoint, dtype and encoded data."""
        hp = self.hparams
        key = {
            "reference": model_identity(hp.get("ref_model_name_or_path") or self.model_name_or_path),
            "dtype": str(hp.get("dtype")),
            # the same weights compute other log-probs under another precision (bf16 vs fp32)
            "precision": str(self.trainer.precision) if self._trainer is not None else "32-true",
            "data": dataset_fingerprint(dataset),
            "split": split,
            "version": 1,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
        root = self.ref_cache_dir
        if root is None:
            base = self.trainer.default_root_dir if self._trainer is not None else "."
            root = os.path.join(base, "ref_logps")
        return os.path.join(root, f"{split}-{digest}.pt")

    def precompute_reference(self, loaders: dict[str, DataLoader]) -> None:
        """Fill ``ref_cache`` for the given splits from disk, or with a temporarily loaded reference model."""
        todo: dict[str, tuple[DataLoader, str]] = {}
        for split, loader in loaders.items():
            if split in self.ref_cache:
                continue
            path = self.reference_cache_file(split, loader.dataset)
            if os.path.exists(path):
                self.ref_cache[split] = torch.load(path, map_location="cpu")
                log.info("reference log-probs of %r loaded from %s", split, path)
            else:
                todo[split] = (loader, path)
        if not todo:
            self.frozen.release("reference")
            return
        if "reference" not in self.frozen:
            if self.deepspeed_engine() is not None and self.deepspeed_engine().zero_optimization_stage() == 3:
                raise RuntimeError(
                    f"reference log-probs of {sorted(todo)} are not cached and, under ZeRO-3, the reference can "
                    "only be built in configure_model: run fit/validate/test on a fresh module"
                )
            self.setup_reference(self.ref_model_name_or_path)  # outside ZeRO-3 a plain load is fine here
            late = self.frozen.get("reference")
            if late is not None:  # built after the strategy set the policy up: match its device and dtype
                policy_param = next(unwrap(self.model).parameters())
                late.to(device=policy_param.device, dtype=policy_param.dtype)
        context = self.trainer.precision_plugin.forward_context() if self._trainer is not None else None
        with context if context is not None else torch.no_grad():
            for split, (loader, path) in todo.items():
                self.ref_cache[split] = self._compute_reference_table(loader)
                if self._trainer is None or self.trainer.is_global_zero:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    tmp = f"{path}.tmp{os.getpid()}"
                    torch.save(self.ref_cache[split], tmp)
                    os.replace(tmp, path)
                    log.info("reference log-probs of %r cached in %s", split, path)
        self.frozen.release("reference")  # training holds the policy only
        if self._trainer is not None:
            self.trainer.strategy.barrier("ref_logps")

    def _compute_reference_table(self, loader: DataLoader) -> dict[str, torch.Tensor]:
        """One ordered pass over ``loader.dataset`` (every sample, whatever the sampler) with the reference."""
        ordered = DataLoader(
            loader.dataset, batch_size=loader.batch_size or 1, shuffle=False, collate_fn=loader.collate_fn
        )
        size = len(loader.dataset)
        table = {
            "sum": torch.zeros(size, 2),
            "mean": torch.zeros(size, 2),
            "count": torch.full((size, 2), -1, dtype=torch.long),
        }
        for batch in ordered:
            batch = self._to_device(batch)
            index = batch["extra"]["sample_index"].cpu()
            if int(index.max()) >= size:
                grow = int(index.max()) + 1 - size
                table = {
                    k: torch.cat([v, torch.full((grow, 2), -1 if k == "count" else 0, dtype=v.dtype)])
                    for k, v in table.items()
                }
                size += grow
            ref = self.reference_log_probs_live(batch)
            for key, value in (("sum", ref.sum), ("mean", ref.mean), ("count", ref.token_count)):
                chosen, rejected = split_pairs(value.detach().cpu().to(table[key].dtype))
                table[key][index] = torch.stack([chosen, rejected], dim=1)
        return table

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        device = self.device

        def move(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            return value

        return move(batch)


# --------------------------------------------------------------------------------------------------
# Reference-free: SimPO and ORPO
# --------------------------------------------------------------------------------------------------


class ReferenceFreeModule(PolicyModule):
    """Preference optimisation without a reference model: SimPO or ORPO (only the policy is in memory).

    Args:
        loss_type: ``simpo`` (Meng et al. 2024: ``-log sigma(beta * (c - r) - gamma)`` on per-token mean
            log-probs) or ``orpo`` (Hong et al. 2024: chosen NLL + ``orpo_lambda`` x odds-ratio loss).
        beta: SimPO reward scale.
        gamma: SimPO target reward margin (in reward units: the paper's ``gamma``).
        label_smoothing: SimPO label smoothing.
        orpo_lambda: ORPO weight of the odds-ratio term.

    Logs the preference statistics of :class:`DPOModule` (rewards are ``beta`` x mean log-probs for SimPO,
    ``orpo_lambda`` x mean log-probs for ORPO), and for ORPO also ``nll_loss``, ``or_loss``, ``log_odds_ratio``.
    ORPO's training NLL is a mean over every chosen token of the optimizer step, across gradient accumulation
    and ranks (:class:`~aa_lightning.algorithms.token_mean.StepTokenMean`); ``train/{loss,nll_loss,or_loss}``
    are that step's values.
    """

    data_kind = "preference"
    metric_names = (*PREFERENCE_METRICS, "nll_loss", "or_loss", "log_odds_ratio")

    def __init__(
        self,
        *args: Any,
        loss_type: Literal["simpo", "orpo"] = "simpo",
        beta: float = 2.0,
        gamma: float = 1.0,
        label_smoothing: float = 0.0,
        orpo_lambda: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if loss_type not in ("simpo", "orpo"):
            raise ValueError(f"unknown loss_type {loss_type!r}; expected 'simpo' or 'orpo'")
        self.loss_type = loss_type
        self.beta = beta
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.orpo_lambda = orpo_lambda
        self.step_nll = StepTokenMean(STEP_CHOSEN_LABEL_TOKENS)

    def compute_loss(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = self.policy_log_probs(batch)
        chosen_mean, rejected_mean = split_pairs(policy.mean)
        chosen_sum, rejected_sum = split_pairs(policy.sum)
        if self.loss_type == "simpo":
            out = simpo_loss(chosen_mean, rejected_mean, self.beta, self.gamma, self.label_smoothing)
            return out.loss, pair_stats(
                out.chosen_rewards, out.rejected_rewards, chosen_sum, rejected_sum, out.losses
            )
        # ORPO: token-level NLL over all chosen tokens (the SFT loss; in training a token mean over the whole
        # optimizer step, see StepTokenMean), odds ratio on mean log-probs (< 0)
        chosen_count, _ = split_pairs(policy.token_count)
        nll_sum, tokens = -chosen_sum.sum(), chosen_count.sum()
        training = stage == "train" and self._trainer is not None
        if training:
            nll = nll_sum * self.step_nll.scale(self.trainer, batch, tokens)
        else:
            nll = nll_sum / tokens.clamp(min=1)
        out = orpo_loss(chosen_mean.clamp(max=-1e-6), rejected_mean.clamp(max=-1e-6), nll, self.orpo_lambda)
        stats = pair_stats(out.chosen_rewards, out.rejected_rewards, chosen_sum, rejected_sum, out.loss)
        stats.update(
            nll_loss=out.nll_loss.detach(), or_loss=out.or_loss.detach(), log_odds_ratio=out.log_odds_ratio
        )
        if training:
            stats.update(nll_sum=nll_sum.detach(), nll_tokens=tokens)
        return out.loss, stats

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """ORPO logs ``train/{loss,nll_loss,or_loss}`` once per optimizer step, as values of the whole step.

        (A micro-batch's NLL is only its share of the step's token mean.) The other statistics are batch means.
        """
        if self.loss_type != "orpo" or self._trainer is None:
            return super().training_step(batch, batch_idx)
        loss, stats = self.compute_loss(batch, "train")
        nll_sum, tokens, or_loss = stats.pop("nll_sum"), stats.pop("nll_tokens"), stats.pop("or_loss")
        del stats["loss"], stats["nll_loss"]
        size = self.batch_size_of(batch)
        means = {f"train/{k}": v.float().mean() for k, v in stats.items() if v.numel()}
        self.log_dict(means, batch_size=size)
        step = self.step_nll.add(
            self.trainer, tokens, nll=nll_sum, or_loss=or_loss, batches=torch.ones_like(or_loss)
        )
        if step is not None:
            nll_loss = (step["nll"] / step["tokens"].clamp(min=1)).float()
            or_loss = (step["or_loss"] / step["batches"]).float()
            self.log("train/loss", nll_loss + self.orpo_lambda * or_loss, prog_bar=True, batch_size=size)
            self.log_dict({"train/nll_loss": nll_loss, "train/or_loss": or_loss}, batch_size=size)
        return loss
