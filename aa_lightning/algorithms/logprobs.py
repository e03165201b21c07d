"""Memory-aware log-probability helpers and masked reductions.

Everything here is a pure tensor function (tensors in, tensors out) except :func:`causal_lm_log_probs`,
which runs a model so that its LM head only sees the positions that are scored. The functions never
materialise a full-vocabulary float32 ``log_softmax`` for the whole batch at once; they work on chunks of
rows (one row = one position, i.e. one vector of ``V`` vocabulary logits), and positions without a label
cost no ``exp`` over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "SequenceLogProbs",
    "causal_lm_log_probs",
    "entropy_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "selective_log_softmax",
    "sequence_log_probs",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _apply_rowwise(
    fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    logits: torch.Tensor,
    index: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """Apply ``fn(rows (N, V), index (N,) | None) -> (N,)`` over chunks of rows of ``logits`` (..., V).

    Chunks are made with ``Tensor.split`` / ``Tensor.unbind`` (one autograd node each, whose backward
    concatenates/stacks the chunk gradients) so the backward pass does not allocate a full-size gradient
    per chunk. Non-contiguous inputs such as ``logits[:, :-1]`` are walked along dim 0 without copying.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead_shape = logits.shape[:-1]
    if index is not None and index.shape != lead_shape:
        raise ValueError(
            f"index shape {tuple(index.shape)} does not match logits shape {tuple(logits.shape)}"
        )
    if logits.dim() == 1:
        return _apply_rowwise(
            fn, logits.unsqueeze(0), None if index is None else index.unsqueeze(0), chunk_size
        )[0]
    if logits.dim() > 2:
        try:
            flat = logits.view(-1, logits.shape[-1])
        except RuntimeError:  # not viewable as rows (e.g. a causal-shift slice): recurse over dim 0
            idx_rows = [None] * logits.shape[0] if index is None else list(index.unbind(0))
            parts = [_apply_rowwise(fn, row, i, chunk_size) for row, i in zip(logits.unbind(0), idx_rows)]
            return torch.stack(parts, dim=0)
        flat_index = None if index is None else index.reshape(-1)
        return _apply_rowwise(fn, flat, flat_index, chunk_size).view(lead_shape)
    # 2-D: (N, V)
    if logits.shape[0] <= chunk_size:
        return fn(logits, index)
    logit_chunks = logits.split(chunk_size, dim=0)
    index_chunks = [None] * len(logit_chunks) if index is None else list(index.split(chunk_size, dim=0))
    return torch.cat([fn(lc, ic) for lc, ic in zip(logit_chunks, index_chunks)], dim=0)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """``log_softmax(x / T)[index]`` for the rows of ``x`` (N, V) picked by ``rows`` (all rows if ``None``).

    The output is float32 (float64 for float64 ``x``): the chunks are upcast before ``/ T`` and the
    ``logsumexp``, and the result is never cast back, since bf16 keeps ~3 significant digits (~0.02 nats at
    typical log-prob sizes) and these values feed PPO ratios, KL terms and DPO sums.

    Forward keeps only the per-row ``logsumexp`` (float32) and a reference to ``x``; backward writes
    ``(onehot(index) - softmax(x / T)) / T``, times the incoming gradient, straight into the one gradient tensor autograd
    needs anyway, chunk by chunk. Compared with ``gather - logsumexp`` under autograd this avoids a second
    full-size temporary and an extra ``exp`` pass (about 2x faster on CPU), and compared with
    ``log_softmax(x).gather`` it keeps no saved full-vocabulary copy. Rows outside ``rows`` cost nothing but
    a zero fill of their gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        index: torch.Tensor,
        rows: torch.Tensor | None,
        chunk_size: int,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        n = x.shape[0]
        out = torch.zeros(n, dtype=acc, device=x.device)
        lse = torch.zeros(n, dtype=acc, device=x.device)
        total = n if rows is None else rows.numel()
        for start in range(0, total, chunk_size):
            end = min(start + chunk_size, total)
            if rows is None:
                where: slice | torch.Tensor = slice(start, end)
                block, idx = x[start:end], index[start:end]
            else:
                where = rows[start:end]
                block, idx = x.index_select(0, where), index.index_select(0, where)
            block = block.to(acc)
            if temperature != 1.0:
                block = block / temperature
            chunk_lse = torch.logsumexp(block, dim=-1)
            lse[where] = chunk_lse
            out[where] = block.gather(-1, idx.unsqueeze(-1)).squeeze(-1) - chunk_lse
        ctx.save_for_backward(x, index, lse, rows)
        ctx.chunk_size = chunk_size
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        x, index, lse, rows = ctx.saved_tensors
        chunk_size, temperature = ctx.chunk_size, ctx.temperature
        acc = lse.dtype
        grad_out = grad_out.to(acc)
        if temperature != 1.0:  # d/dx of f(x / T) is f'(x / T) / T
            grad_out = grad_out / temperature
        n = x.shape[0]
        total = n if rows is None else rows.numel()
        if rows is None:
            grad = torch.empty_like(x, memory_format=torch.contiguous_format)
        else:
            grad = torch.zeros_like(x, memory_format=torch.contiguous_format)
        for start in range(0, total, chunk_size):
            end = min(start + chunk_size, total)
            if rows is None:
                block, idx = x[start:end], index[start:end]
                g, chunk_lse = grad_out[start:end], lse[start:end]
            else:
                where = rows[start:end]
                block, idx = x.index_select(0, where), index.index_select(0, where)
                g, chunk_lse = grad_out.index_select(0, where), lse.index_select(0, where)
            g = g.unsqueeze(-1)
            in_place = rows is None and x.dtype == acc
            # d log p_i / d z_j = [i == j] - softmax(z)_j with z = x / T, scaled by the incoming gradient
            if in_place and temperature == 1.0:
                chunk_grad = torch.sub(block, chunk_lse.unsqueeze(-1), out=grad[start:end])
            elif in_place:
                chunk_grad = torch.div(block, temperature, out=grad[start:end]).sub_(chunk_lse.unsqueeze(-1))
            else:
                chunk_grad = block.to(acc) / temperature - chunk_lse.unsqueeze(-1)
            chunk_grad.exp_().mul_(-g).scatter_add_(-1, idx.unsqueeze(-1), g)
            if rows is not None:
                grad.index_copy_(0, where, chunk_grad.to(grad.dtype))
            elif not in_place:
                grad[start:end] = chunk_grad
        return grad, None, None, None, None


def _viewable_as_rows(logits: torch.Tensor) -> bool:
    try:
        logits.view(-1, logits.shape[-1])
    except RuntimeError:
        return False
    return True


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    chunk_size: int = 512,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probabilities of the selected tokens: ``log_softmax(logits / temperature, -1).gather(-1, index)``.

    ``log p(index) = z[index] - logsumexp(z)`` with ``z = logits / temperature``, evaluated on chunks of
    ``chunk_size`` rows so that no full-vocabulary log-softmax of the whole batch exists at once. Each chunk
    is upcast to float32 (float64 for float64 logits) before the division and the ``logsumexp``, and the
    result stays in that dtype: casting it back to bf16 would cost ~0.02 nats per token. A fused backward
    writes the gradient (in the logits' dtype) in place, chunk by chunk. Differentiable with respect to
    ``logits``.

    Args:
        logits: ``(..., V)`` unnormalised scores; may be non-contiguous (e.g. ``logits[:, :-1]``).
        index: ``(...)`` int64 token ids in ``[0, V)`` (no ignore-index values).
        chunk_size: number of rows (positions) processed at a time.
        mask: optional ``(...)`` bool: only these positions are computed; the others return 0 and get a zero
            gradient (no ``exp`` over their vocabulary at all). Finding them is a host sync on accelerators.
        temperature: the logits are divided by it (in float32, chunk by chunk): the sampling temperature.

    Returns:
        ``(...)`` log-probabilities, float32 (float64 for float64 ``logits``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead_shape = logits.shape[:-1]
    if index.shape != lead_shape:
        raise ValueError(
            f"index shape {tuple(index.shape)} does not match logits shape {tuple(logits.shape)}"
        )
    if mask is not None and mask.shape != lead_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits shape {tuple(logits.shape)}")
    if not _viewable_as_rows(logits):  # e.g. a causal-shift slice: one call per leading index, no copy
        parts = [
            selective_log_softmax(row, idx, chunk_size, None if mask is None else m, temperature)
            for row, idx, m in zip(
                logits.unbind(0), index.unbind(0), [None] * len(index) if mask is None else mask.unbind(0)
            )
        ]
        return torch.stack(parts, dim=0)
    rows = None if mask is None else mask.reshape(-1).nonzero().squeeze(-1)
    flat = logits.view(-1, logits.shape[-1])
    out = _SelectiveLogSoftmax.apply(flat, index.reshape(-1), rows, chunk_size, float(temperature))
    return out.view(lead_shape)


def entropy_from_logits(
    logits: torch.Tensor, chunk_size: int = 512, temperature: float = 1.0
) -> torch.Tensor:
    """Entropy of the categorical distribution ``softmax(logits / temperature)`` at every position.

    ``H = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v z_v`` with ``z = logits / temperature``,
    computed on chunks of ``chunk_size`` rows (half-precision chunks are upcast to float32 one chunk at a
    time, before the division, as in :func:`selective_log_softmax`).

    Args:
        logits: ``(..., V)``.
        chunk_size: number of rows processed at a time.
        temperature: the logits are divided by it.

    Returns:
        ``(...)`` entropies in nats (float32 for bf16/fp16 inputs, else the input dtype).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def rows_entropy(rows: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        z = rows.float() if rows.dtype in _LOW_PRECISION else rows
        if temperature != 1.0:
            z = z / temperature
        return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)

    return _apply_rowwise(rows_entropy, logits, None, chunk_size)


class SequenceLogProbs(NamedTuple):
    """Per-sequence log-probabilities over response tokens (see :func:`sequence_log_probs`)."""

    sum: torch.Tensor  # (B,) sum of token log-probs over response tokens
    mean: torch.Tensor  # (B,) sum / max(token_count, 1)
    token_count: torch.Tensor  # (B,) int64 number of response tokens
    token_log_probs: torch.Tensor  # (B, T-1) log-probs of labels[:, 1:], 0 where masked
    mask: torch.Tensor  # (B, T-1) bool, labels[:, 1:] != ignore_index


def sequence_log_probs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int = 512,
    temperature: float = 1.0,
) -> SequenceLogProbs:
    """Causal-LM log-probabilities of ``labels`` under ``logits``, summed/averaged per sequence.

    Position ``t`` of ``logits`` predicts token ``t + 1``: ``logp_t = log_softmax(logits[:, t])[labels[:, t+1]]``
    for ``t = 0..T-2``. Only positions whose shifted label differs from ``ignore_index`` count.
    ``sum_b = sum_t mask_bt * logp_bt`` and ``mean_b = sum_b / max(count_b, 1)`` (0 for rows without
    response tokens). Token log-probs are returned in float32 (float64 for float64 logits).

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` token ids, ``ignore_index`` for prompt/padding positions.
        ignore_index: label value excluded from the sums.
        chunk_size: rows per chunk passed to :func:`selective_log_softmax`.
        temperature: the logits are divided by it (in float32, chunk by chunk).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T); got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != ignore_index
    safe_labels = torch.where(mask, shifted_labels, torch.zeros_like(shifted_labels))
    # On CPU only labelled rows are computed (their selection costs nothing there); on accelerators every row
    # is, which is cheap and avoids the host sync that selecting a data-dependent number of rows needs.
    select = logits.device.type == "cpu"
    if _viewable_as_rows(logits):
        # the full (B, T, V) logits with the labels shifted left: a plain row view, no slice of the logits
        # (whose backward would zero-fill and copy a full-size gradient)
        no_label = torch.zeros_like(mask[:, :1])
        full_mask = torch.cat([mask, no_label], dim=1) if select else None
        full_index = torch.cat([safe_labels, torch.zeros_like(safe_labels[:, :1])], dim=1)
        token_lp = selective_log_softmax(
            logits, full_index, chunk_size=chunk_size, mask=full_mask, temperature=temperature
        )[:, :-1]
    else:
        token_lp = selective_log_softmax(
            logits[:, :-1],
            safe_labels,
            chunk_size=chunk_size,
            mask=mask if select else None,
            temperature=temperature,
        )
    token_lp = torch.where(mask, token_lp, torch.zeros_like(token_lp))
    count = mask.sum(dim=-1)
    total = token_lp.sum(dim=-1)
    mean = total / count.clamp(min=1).to(total.dtype)
    return SequenceLogProbs(sum=total, mean=mean, token_count=count, token_log_probs=token_lp, mask=mask)


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Module) else None


def causal_lm_log_probs(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int = 512,
    temperature: float = 1.0,
) -> SequenceLogProbs:
    """:func:`sequence_log_probs` of ``model(**inputs)``, running the LM head only where a label is scored.

    A forward pre-hook on the model's output embeddings (its LM head) hands it just the hidden states of the
    positions whose next token has a label, so prompt and padding positions never go through the
    vocabulary projection, the log-softmax or their backward (``(B, T, V)`` logits never exist). Whatever
    the model does after its head (soft-capping, scaling, an upcast) applies unchanged, row by row.

    Falls back to the full logits (same result, no extra forward) when the model has no output embeddings
    or its head does not see one hidden vector per input token (e.g. models that insert media features).

    Args:
        model: a causal LM (``forward(**inputs).logits``); peft-wrapped models work too.
        inputs: its forward inputs (everything but the labels); ``use_cache=False`` is added.
        labels: ``(B, T)`` token ids, ``ignore_index`` where nothing is scored.
        ignore_index: label value excluded from the sums.
        chunk_size: rows per chunk of the log-softmax.
        temperature: the logits are divided by it (sampling temperature of RL rollouts), in float32.
    """
    shifted = labels[:, 1:]
    mask = shifted != ignore_index
    positions = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)  # hidden state t predicts token t + 1
    selected = False

    def select(module: nn.Module, args: tuple) -> tuple | None:
        nonlocal selected
        hidden = args[0]
        if not isinstance(hidden, torch.Tensor) or hidden.shape[:-1] != positions.shape:
            return None
        selected = True
        return (hidden[positions.to(hidden.device)], *args[1:])

    head = _output_embeddings(model)
    handle = head.register_forward_pre_hook(select) if head is not None else None
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    if not selected:
        return sequence_log_probs(logits, labels, ignore_index, chunk_size, temperature)
    picked = selective_log_softmax(
        logits, shifted[mask].to(logits.device), chunk_size=chunk_size, temperature=temperature
    )
    token_lp = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(
        mask.to(picked.device), picked
    )
    mask = mask.to(picked.device)
    count = mask.sum(dim=-1)
    total = token_lp.sum(dim=-1)
    mean = total / count.clamp(min=1).to(total.dtype)
    return SequenceLogProbs(sum=total, mean=mean, token_count=count, token_log_probs=token_lp, mask=mask)


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
