"""Metrics of a rollout: running score statistics, a rank-exact accumulator, the critic's explained
variance and the markdown table of samples (pure computations, nothing is logged here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from aa_lightning.algorithms.logprobs import masked_mean
from aa_lightning.models.token_outputs import describe_output

__all__ = ["MetricAccumulator", "RunningMoments", "explained_variance", "samples_markdown"]


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over masked tokens (1 = perfect critic, <= 0 = useless)."""
    m = mask.bool()
    ret_mean = masked_mean(returns, m)
    var_ret = masked_mean((returns - ret_mean) ** 2, m)
    diff = returns - values
    var_diff = masked_mean((diff - masked_mean(diff, m)) ** 2, m)
    return 1.0 - var_diff / var_ret.clamp(min=1e-8)


class RunningMoments:
    """Running mean / std of all scores seen so far (parallel Welford merge, float64, CPU).

    Kept out of the module's buffers on purpose: DeepSpeed bf16 and ``bf16-true`` precision cast floating
    buffers to bf16 (3 significant digits). The state travels in the checkpoint through
    ``on_save_checkpoint`` instead.
    """

    def __init__(self) -> None:
        self.mean = torch.zeros((), dtype=torch.float64)
        self.var = torch.ones((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def update(self, values: torch.Tensor) -> None:
        x = values.detach().to("cpu", torch.float64).flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean = x.mean()
        batch_var = x.var(correction=0)
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean = self.mean + delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        """Unbiased std (population std times ``sqrt(n / (n - 1))``), 1 before any update."""
        if self.count <= 1:
            return torch.ones((), dtype=torch.float64)
        return (self.var * self.count / (self.count - 1)).sqrt()

    def normalize(self, values: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        mean = self.mean.to(values.device, values.dtype)
        std = self.std.to(values.device, values.dtype)
        return (values - mean) / (std + eps)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.mean = state["mean"].to(torch.float64)
        self.var = state["var"].to(torch.float64)
        self.count = state["count"].to(torch.float64)


class MetricAccumulator:
    """Sums and counts of metrics, reduced over ranks in ONE collective, then divided.

    ``add_mean(name, values, mask)`` adds the masked sum and count (global means weigh every element the
    same on every rank), ``add_std`` also tracks sums of squares. Nothing is moved to the host here.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.squares: dict[str, torch.Tensor] = {}

    def add(self, name: str, total: torch.Tensor, count: torch.Tensor | float) -> None:
        total = total.detach().double()
        count = torch.as_tensor(count, dtype=torch.float64, device=total.device)
        self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.counts[name] = self.counts[name] + count if name in self.counts else count

    def add_mean(self, name: str, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        values = values.detach().double()
        if mask is None:
            self.add(name, values.sum(), values.numel())
        else:
            m = mask.bool()
            self.add(name, torch.where(m, values, torch.zeros_like(values)).sum(), m.sum())

    def add_std(self, name: str, values: torch.Tensor) -> None:
        """Track mean and std of ``values`` (``name`` and ``name + '_std'``)."""
        values = values.detach().double().flatten()
        self.add_mean(name, values)
        square = (values**2).sum()
        self.squares[name] = self.squares[name] + square if name in self.squares else square

    def compute(self, reduce: Any = None) -> dict[str, torch.Tensor]:
        """Means (and stds) over everything added, summed over ranks with ``reduce(tensor)`` first."""
        names = list(self.sums)
        if not names:
            return {}
        sq_names = list(self.squares)
        stacked = torch.stack(
            [self.sums[n] for n in names]
            + [self.counts[n] for n in names]
            + [self.squares[n] for n in sq_names]
        )
        if reduce is not None:
            stacked = reduce(stacked)
        k = len(names)
        sums, counts, squares = stacked[:k], stacked[k : 2 * k], stacked[2 * k :]
        out = {n: (sums[i] / counts[i].clamp(min=1)).float() for i, n in enumerate(names)}
        for j, n in enumerate(sq_names):
            i = names.index(n)
            c = counts[i]
            var = (squares[j] - sums[i] ** 2 / c.clamp(min=1)) / (c - 1).clamp(min=1)
            out[f"{n}_std"] = var.clamp(min=0).sqrt().float()
        return out


def samples_markdown(
    prompts: Sequence[str],
    responses: Sequence[Any],
    columns: dict[str, Sequence[float]],
    max_chars: int = 400,
) -> str:
    """A markdown table (TensorBoard ``add_text`` renders it) of prompts, responses and numbers (a decoded
    image response is named by its size; the media logger shows the image itself)."""

    def cell(output: Any) -> str:
        text = describe_output(output)
        text = text if len(text) <= max_chars else text[: max_chars - 3] + "..."
        return text.replace("|", "\\|").replace("\r", " ").replace("\n", "<br>")

    header = "| # | prompt | response | " + " | ".join(columns) + " |"
    rule = "|---|---|---|" + "---|" * len(columns)
    rows = [
        f"| {i} | {cell(p)} | {cell(r)} | " + " | ".join(f"{columns[c][i]:.4g}" for c in columns) + " |"
        for i, (p, r) in enumerate(zip(prompts, responses))
    ]
    return "\n".join([header, rule, *rows])
