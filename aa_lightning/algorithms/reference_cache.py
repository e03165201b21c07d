"""Reference log-probs computed once per split and cached in memory and on disk, keyed by fingerprints.

The on-disk key is a fingerprint of the reference checkpoint (path, config, weight files), the load dtype,
the trainer precision and the encoded data, so a restart with the same inputs recomputes nothing and any
change (new weights, other data, bf16 vs fp32) misses the cache instead of reading stale numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader

from aa_lightning.algorithms.logprobs import deterministic_scores
from aa_lightning.algorithms.policy import ReferencePolicyModule
from aa_lightning.batch import EXTRA, IGNORE_INDEX, LABELS, SAMPLE_INDEX, split_pairs
from aa_lightning.models.aliases import resolve_model_path
from aa_lightning.models.unwrap import unwrap

log = logging.getLogger(__name__)

__all__ = ["PrecomputedReferenceModule", "dataset_fingerprint", "label_counts", "model_identity"]


def label_counts(labels: torch.Tensor) -> torch.Tensor:
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


class PrecomputedReferenceModule(ReferencePolicyModule):
    """A reference policy whose log-probs can be computed once per split and cached (DPO).

    Args:
        precompute_ref_log_probs: compute the reference log-probs of every train/val sample once before
            training (cached in memory keyed by ``sample_index`` and on disk keyed by a fingerprint of the
            reference model and the encoded data), then drop the reference model: training then holds only
            the policy. A restart finds the file and recomputes nothing.
        ref_cache_dir: where the reference log-prob files go; default ``<default_root_dir>/ref_logps``.

    Subclasses call :meth:`reference_log_probs` in their ``compute_loss``; it reads the live reference or the
    cached table, whichever is configured.
    """

    def __init__(
        self,
        *args: Any,
        precompute_ref_log_probs: bool = False,
        ref_cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.precompute_ref_log_probs = precompute_ref_log_probs
        self.ref_cache_dir = ref_cache_dir
        # split -> {"sum": (N, 2), "mean": (N, 2), "count": (N, 2)} on CPU; count -1 = not computed
        self.ref_cache: dict[str, dict[str, torch.Tensor]] = {}

    # -- reference: live model, or only while its log-probs are precomputed ---------------------------
    def configure_reference(self) -> None:
        """Live reference: always. Precomputed: built here only when some needed table is not on disk yet,
        so under ZeRO-3 it is sharded like the policy; it is released once the tables are filled."""
        if self.precompute_ref_log_probs and not deterministic_scores(self.model):
            raise ValueError(
                f"precompute_ref_log_probs: {type(unwrap(self.model)).__name__} scores a row at a noise drawn for "
                "each batch, so reference scores cannot be computed once per sample; use the live reference "
                "(precompute_ref_log_probs: false)"
            )
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
        index = (batch.get(EXTRA) or {}).get(SAMPLE_INDEX)
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
        if not torch.equal(expected, label_counts(batch[LABELS]).cpu()):
            raise RuntimeError(
                f"the cached reference log-probs of the {stage!r} split do not match this batch's tokens "
                "(stale cache: delete the ref_logps files or change ref_cache_dir)"
            )
        device = batch[LABELS].device
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
        key = {
            "reference": model_identity(self.ref_model_name_or_path or self.model_name_or_path),
            "dtype": str(self.load_dtype),  # AlignModule's load dtype, as configured
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
            index = batch[EXTRA][SAMPLE_INDEX].cpu()
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
