"""The batch contract: what the data layer writes and the algorithms read, so neither imports the other.

Collators (:mod:`aa_lightning.data.collators`, :mod:`aa_lightning.data.multimodal_collator`, the
text-to-image collator) build the batches
described by :class:`SupervisedBatch`, :class:`PreferenceBatch` and :class:`PromptOnlyBatch`; the
algorithms read them through the names defined here. The one rule that keeps algorithms modality-free:
every top-level tensor except ``labels`` is a model input (:func:`model_inputs`), so media tensors
(``pixel_values``, ``image_grid_thw``, ``input_features`` ...) reach the model without an algorithm naming
them.

``batch["extra"]`` holds ``(B,)`` tensors: the numeric and boolean meta values present in every sample of
the batch (:data:`DESIRABLE`, :data:`CHOSEN_IS_SAFE`, :data:`REJECTED_IS_SAFE`, :data:`MARGIN`, ...),
:data:`SAMPLE_INDEX`, and in training batches the label-token counts of the optimizer step:

``batch["extra"][STEP_LABEL_TOKENS]`` and, in preference batches, ``batch["extra"][STEP_CHOSEN_LABEL_TOKENS]``
are ``(B,)`` int64 tensors whose rows all hold one number: how many labelled target tokens
(``labels[1:] != -100``, the positions a causal-LM loss scores) this rank's whole accumulation window
holds, the window being the micro-batches of the optimizer step this batch belongs to. STEP_LABEL_TOKENS
counts every row (supervised: all; preference: chosen and rejected), STEP_CHOSEN_LABEL_TOKENS the chosen
rows only. With them a token-mean loss can divide by the token count of the whole step from the step's
first micro-batch on (see :mod:`aa_lightning.algorithms.token_mean`). The training loader of the
datamodules adds them when it runs under a Trainer.

Sequences and media rows: every model input is one row a sequence (batch-first), except the inputs named in
``batch[MEDIA_ROWS]`` (media stacked per item or per patch; each maps to an ``(N,)`` long tensor of the rows
each sequence owns, in order), and the per-token inputs named in ``batch[PER_TOKEN_KEYS]`` have the
``(N, L)`` shape of ``input_ids``. Collators state both, so code that repeats a batch
(:func:`repeat_batch_inputs`), takes some of its sequences (:func:`select_sequences`) or appends generated
tokens (:func:`extend_per_token_inputs`) never needs to know the modality.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

import torch
from torch import nn

__all__ = [
    "CHOSEN_IS_SAFE",
    "DESIRABLE",
    "EXTRA",
    "IGNORE_INDEX",
    "IMAGE_CODES",
    "LABELS",
    "MARGIN",
    "MEDIA_ROWS",
    "META",
    "NOISE_SEED",
    "NON_MODEL_KEYS",
    "PER_TOKEN_KEYS",
    "PROMPT_STREAM",
    "PTX_STREAM",
    "REJECTED_IS_SAFE",
    "SAMPLE_INDEX",
    "SAMPLE_KINDS",
    "STEP_CHOSEN_LABEL_TOKENS",
    "STEP_LABEL_TOKENS",
    "PreferenceBatch",
    "PromptOnlyBatch",
    "SampleKind",
    "SupervisedBatch",
    "extend_per_token_inputs",
    "model_inputs",
    "repeat_batch_inputs",
    "select_media_rows",
    "select_sequences",
    "split_pairs",
]

SampleKind = Literal["supervised", "preference", "prompt_only"]
#: Sample kinds, in the order used by messages and ``BaseFormatter.supported_kinds``.
SAMPLE_KINDS: tuple[SampleKind, ...] = ("supervised", "preference", "prompt_only")

#: ``labels`` value of a position no loss scores (prompt, padding); PyTorch's cross-entropy default.
IGNORE_INDEX = -100

# -- top-level batch keys (media tensors keep the names their processor gives them) ---------------------
#: ``(N, L)`` long, supervised and preference batches: target token ids (:data:`IGNORE_INDEX`: not scored).
LABELS = "labels"
#: ``dict[str, (B,) tensor]``, every batch: per-sample numbers and flags, keyed by the names further below.
EXTRA = "extra"
#: ``list[dict]``, every batch: each sample's meta dict (prompts, reference answers, media paths ...).
META = "meta"

# -- a prompt-only train batch with a supervised stream is ``{PROMPT_STREAM: ..., PTX_STREAM: ...}`` -----
#: the prompt-only batch the rollouts sample from.
PROMPT_STREAM = "prompt"
#: the supervised batch of PPO's pre-training mix (the datamodule's ``ptx`` data).
PTX_STREAM = "ptx"

# -- keys of ``batch["extra"]`` (and of the formatters' meta dicts they come from) ----------------------
#: ``(B,)`` long: each sample's index in its split (stable across epochs; keys cached per-sample values).
SAMPLE_INDEX = "sample_index"
#: ``(B,)`` bool, KTO: the row is a desirable example (set by the KTO formatter).
DESIRABLE = "desirable"
#: ``(B,)`` bool, cost models: the chosen (safer) / rejected response is safe (set by safety formatters).
CHOSEN_IS_SAFE = "chosen_is_safe"
REJECTED_IS_SAFE = "rejected_is_safe"
#: ``(B,)`` float, reward models: a per-pair margin the chosen score should beat the rejected one by.
MARGIN = "margin"
#: ``(B,)`` long, training batches: label tokens of this rank's accumulation window (see module docstring).
STEP_LABEL_TOKENS = "step_label_tokens"
STEP_CHOSEN_LABEL_TOKENS = "step_chosen_label_tokens"

# -- layout keys (see "Sequences and media rows" above) -------------------------------------------------
#: ``dict[str, (N,) long]``: for each model input that is not one row a sequence, the rows each sequence owns.
MEDIA_ROWS = "media_rows"
#: ``list[str]``: the model inputs with the ``(N, L)`` shape of ``input_ids`` (e.g. token type ids).
PER_TOKEN_KEYS = "per_token_keys"

#: ``(N,)`` int64, diffusion batches: the seed of each row's noise and timestep (a pair's rows share it).
NOISE_SEED = "noise_seed"

#: ``(N, L)`` long, image-code batches of families whose image codes are not vocabulary ids (Janus): the VQ
#: codebook index at each image position (where ``input_ids`` holds the image placeholder token),
#: :data:`IGNORE_INDEX` on text and padding. A per-token model input (listed in :data:`PER_TOKEN_KEYS`) the
#: model embeds and scores with its own image head; the rows' ``labels`` equal it, so step token counts
#: count codes.
IMAGE_CODES = "image_codes"

#: Top-level batch keys that are not model inputs.
NON_MODEL_KEYS = frozenset({LABELS})


class _BatchBase(TypedDict, total=False):
    """Keys every batch kind has (``extra`` and ``meta`` always; media tensors from multimodal data)."""

    input_ids: torch.Tensor  # (N, L) long
    attention_mask: torch.Tensor  # (N, L) long, 1 on real tokens
    extra: dict[str, torch.Tensor]  # (B,) tensors, keys above
    meta: list[dict[str, Any]]  # one dict per sample: prompts, reference answers, media paths ...


class SupervisedBatch(_BatchBase, total=False):
    """SFT / KTO: ``B`` right-padded rows; ``labels`` holds the token id on trained tokens, -100 elsewhere."""

    labels: torch.Tensor  # (B, L) long


class PreferenceBatch(_BatchBase, total=False):
    """DPO / SimPO / ORPO / reward models: ``N = 2B`` right-padded rows, the ``B`` chosen rows first and
    then the ``B`` rejected rows, so one forward scores both (:func:`split_pairs` takes them apart)."""

    labels: torch.Tensor  # (2B, L) long


class PromptOnlyBatch(_BatchBase, total=False):
    """PPO / GRPO / Safe-RLHF: ``B`` left-padded prompts ending with the generation prompt (no labels)."""


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


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) halves of a ``(2B, ...)`` tensor from a preference batch."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def _is_identity(index: torch.Tensor, n: int) -> bool:
    return index.numel() == n and bool(torch.equal(index.cpu(), torch.arange(n)))


def select_sequences(
    inputs: dict[str, torch.Tensor],
    index: torch.Tensor,
    num_sequences: int,
    media_rows: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The model inputs of the sequences ``index`` (in that order, repeats allowed) of an ``N``-sequence batch.

    Batch-first tensors are indexed; an input named in ``media_rows`` gives each chosen sequence its own
    rows; scalars pass. An input with another first dimension and no rows is only safe when the whole
    batch is kept, or with one sequence (all its rows are that sequence's, tiled once per copy); otherwise
    this raises, naming the input.
    """
    media_rows = media_rows or {}
    if _is_identity(index, num_sequences):
        return dict(inputs)
    out: dict[str, torch.Tensor] = {}
    for key, value in inputs.items():
        if value.dim() == 0:
            out[key] = value
        elif key in media_rows:
            rows = media_rows[key].to(torch.long).cpu()
            if int(rows.sum()) != value.shape[0]:
                raise ValueError(
                    f"batch[{MEDIA_ROWS!r}][{key!r}] gives {int(rows.sum())} rows, the input has {value.shape[0]}"
                )
            starts = rows.cumsum(0) - rows
            picked = [torch.arange(int(starts[i]), int(starts[i] + rows[i])) for i in index.tolist()]
            flat = torch.cat(picked) if picked else torch.zeros(0, dtype=torch.long)
            if flat.numel():  # sequences without media of this kind: the model gets no such input at all
                out[key] = value[flat.to(value.device)]
        elif value.shape[0] == num_sequences:
            out[key] = value[index.to(value.device)]
        elif num_sequences == 1:
            out[key] = value.repeat(index.numel(), *[1] * (value.dim() - 1))
        else:
            raise ValueError(
                f"cannot split model input {key!r} of shape {tuple(value.shape)} per sequence ({num_sequences} "
                f"sequences): its rows are not one per sequence and the batch does not say whose they are "
                f"(batch[{MEDIA_ROWS!r}]); have the collator state them, or use batch_size 1 (per device)"
            )
    return out


def select_media_rows(media_rows: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The :data:`MEDIA_ROWS` entry of the sequences ``index`` (to go with :func:`select_sequences`: inputs of
    which the chosen sequences hold no rows are left out of both)."""
    picked = {key: rows[index.to(rows.device)] for key, rows in media_rows.items()}
    return {key: rows for key, rows in picked.items() if int(rows.sum())}


def repeat_batch_inputs(
    inputs: dict[str, torch.Tensor],
    repeats: int,
    batch_size: int,
    media_rows: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Each sequence ``repeats`` times in a row (GRPO groups), media rows included (:func:`select_sequences`)."""
    if repeats == 1:
        return dict(inputs)
    index = torch.arange(batch_size).repeat_interleave(repeats)
    return select_sequences(inputs, index, batch_size, media_rows)


def extend_per_token_inputs(
    inputs: dict[str, torch.Tensor],
    prompt_ids: torch.Tensor,
    num_new_tokens: int,
    per_token_keys: list[str] | tuple[str, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """Extend the per-token inputs of a prompt batch over ``num_new_tokens`` appended (generated) tokens.

    Appended tokens are text, so per-token inputs are padded with zeros, as ``generate`` itself does. The
    per-token inputs are ``per_token_keys`` (the batch's :data:`PER_TOKEN_KEYS`); a batch that does not
    state them is read by shape: a non-float tensor of exactly the ``(N, prompt_len)`` shape of
    ``prompt_ids``. Everything else passes unchanged. ``input_ids`` and ``attention_mask`` are not
    expected here (whoever appends the tokens builds them).
    """
    if num_new_tokens <= 0:
        return dict(inputs)
    out = {}
    for key, value in inputs.items():
        if per_token_keys is not None:
            extend = key in per_token_keys
        else:
            extend = (
                value.shape == prompt_ids.shape and not value.is_floating_point() and not value.is_complex()
            )
        if extend:
            value = torch.cat([value, value.new_zeros(value.shape[0], num_new_tokens)], dim=1)
        out[key] = value
    return out
