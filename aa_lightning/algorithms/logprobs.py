"""Sequence-level log-probabilities: per-row sums / means of the labelled tokens, and the model forward.

:func:`output_log_probs` is what the preference and SFT modules call: "how well does this model explain each
row's output". A model family that is not a causal LM answers it itself, through an ``explain_outputs``
method returning per-row ``(sum, count)`` (diffusion models: the Gaussian log-likelihood of the noise,
``-0.5 * MSE``, at a per-row seeded noise and timestep); causal LMs answer with the log-probs of the labels.
The algorithms never ask which kind they hold.

:func:`sequence_log_probs` is a pure tensor function; :func:`causal_lm_log_probs` runs a model so that its LM
head only sees the positions that are scored. Both use the chunked kernel of :mod:`.log_softmax` (no
full-vocabulary float32 table). The kernel and the masked reductions (:mod:`.masked`) are re-exported here,
their old import location.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from aa_lightning.algorithms.log_softmax import _viewable_as_rows, entropy_from_logits, selective_log_softmax
from aa_lightning.algorithms.masked import masked_mean, masked_sum, masked_var, masked_whiten
from aa_lightning.batch import LABELS, model_inputs

__all__ = [
    "SequenceLogProbs",
    "causal_lm_log_probs",
    "deterministic_scores",
    "explains_its_outputs",
    "entropy_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "output_log_probs",
    "selective_log_softmax",
    "sequence_log_probs",
]


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


def explains_its_outputs(model: nn.Module) -> bool:
    """Whether the model family scores its outputs itself (``explain_outputs``) rather than by label log-probs."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DeepSpeed / DDP wrappers
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return callable(getattr(base, "explain_outputs", None))


def deterministic_scores(model: nn.Module) -> bool:
    """Whether a row's score depends on the sample alone (False for families scoring at a sampled noise)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "deterministic_scores", True))


def output_log_probs(model: nn.Module, batch: dict[str, Any]) -> SequenceLogProbs:
    """How well ``model`` explains each row's output, as :class:`SequenceLogProbs` (one forward).

    Causal LMs: :func:`causal_lm_log_probs` of ``batch["labels"]``. Families with ``explain_outputs`` are
    called through the (possibly wrapped) model's ``forward``, which is ``explain_outputs`` for them, so
    DeepSpeed's and peft's forward hooks run; their per-row ``(sum, count)`` becomes a one-unit row.
    """
    inputs = model_inputs(batch, model)
    if not explains_its_outputs(model):
        return causal_lm_log_probs(model, inputs, batch[LABELS])
    scores = model(**inputs)
    total = scores.sum
    count = scores.count.to(device=total.device, dtype=torch.long)
    mean = total / count.clamp(min=1).to(total.dtype)
    mask = torch.ones(total.shape[0], 1, dtype=torch.bool, device=total.device)
    return SequenceLogProbs(
        sum=total, mean=mean, token_count=count, token_log_probs=total[:, None], mask=mask
    )
