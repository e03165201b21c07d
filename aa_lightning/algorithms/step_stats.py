"""Step/metric plumbing shared by the preference and reward modules: one ``compute_loss`` per step.

Training logs batch means each step; validation and test log means over the whole held-out set, exact
over all ranks (so ``aa validate`` reports set-level numbers, not a mean of batch means).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from aa_lightning.algorithms.base import AlignModule
from aa_lightning.algorithms.eval_metrics import UniqueSampleSums, sample_indices
from aa_lightning.batch import EXTRA, SAMPLE_INDEX

__all__ = ["PREFERENCE_METRICS", "StageMeans", "StepStatsModule", "pair_stats"]

PREFERENCE_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


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
        extra = batch.get(EXTRA) or {}
        if SAMPLE_INDEX in extra:
            return int(extra[SAMPLE_INDEX].shape[0])
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
