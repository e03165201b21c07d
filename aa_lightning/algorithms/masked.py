"""Masked reductions (sum, mean, variance, whitening) over the tokens a mask selects; pure tensor functions."""

from __future__ import annotations

import torch

__all__ = ["masked_mean", "masked_sum", "masked_var", "masked_whiten"]


def _prepare_mask(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.shape != values.shape:
        mask = mask.expand_as(values)
    return mask.bool()


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(values * mask)`` over ``dim`` (all elements if ``None``); masked entries (even NaN/inf) are ignored.

    Args:
        values: any shape ``S``.
        mask: bool or {0, 1} tensor broadcastable to ``S``.
        dim: reduction dimension or ``None``.
    """
    m = _prepare_mask(values, mask)
    zeroed = torch.where(m, values, torch.zeros_like(values))
    return zeroed.sum() if dim is None else zeroed.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(values * mask) / max(sum(mask), 1)`` over ``dim`` (all elements if ``None``).

    Returns 0 where the mask has no true entries.

    Args:
        values: any shape ``S``.
        mask: bool or {0, 1} tensor broadcastable to ``S``.
        dim: reduction dimension or ``None``.
    """
    m = _prepare_mask(values, mask)
    total = masked_sum(values, m, dim)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (global reduction, scalar result).

    ``var = sum(mask * (x - mu)^2) / n`` with ``mu = masked_mean(x)`` and ``n = sum(mask)``; with
    ``unbiased=True`` multiplied by ``n / (n - 1)`` (Bessel), skipped when ``n <= 1``.

    Args:
        values: any shape ``S``.
        mask: bool or {0, 1} tensor broadcastable to ``S``.
        unbiased: apply Bessel's correction.
    """
    m = _prepare_mask(values, mask)
    mean = masked_mean(values, m)
    var = masked_mean((values - mean) ** 2, m)
    if unbiased:
        n = m.sum().to(var.dtype)
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten with masked statistics: ``(x - mu) / sqrt(var + eps)`` (``+ mu`` back if ``shift_mean=False``).

    ``mu`` and ``var`` (unbiased) come from the masked entries only; entries outside the mask are set to 0.

    Args:
        values: any shape ``S``.
        mask: bool or {0, 1} tensor broadcastable to ``S``.
        shift_mean: if False, keep the original mean (only rescale).
        eps: numerical floor inside the square root.
    """
    m = _prepare_mask(values, mask)
    mean = masked_mean(values, m)
    var = masked_var(values, m, unbiased=True)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros_like(whitened))
