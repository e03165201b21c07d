"""Encoded samples -> a batch dict, the contract between datamodules and algorithms.

Batch keys (all algorithms read only these; media keys are whatever the processor yields):

- ``input_ids`` (N, L), ``attention_mask`` (N, L): the model inputs. Supervised and preference batches are
  right-padded, prompt-only batches left-padded (ready for ``generate``).
- ``labels`` (N, L): token id on trained (assistant) tokens, -100 elsewhere (supervised, preference).
- preference batches hold chosen rows first, then rejected rows: N = 2B, rows ``[:B]`` are chosen and
  ``[B:]`` rejected, so one forward scores both.
- ``meta``: list of per-sample dicts (reference answers, prompts, media paths ...).
- ``extra``: dict of (B,) tensors made from the numeric and boolean meta values present in every sample
  (``margin``, ``chosen_is_safe``, ``rejected_is_safe``, ``desirable`` ...), and ``sample_index`` (B,):
  each sample's index in its split (stable across epochs and shuffles; keys for cached per-sample values).
  Training batches also hold the label-token counts of their optimizer step (``step_label_tokens`` ...,
  added by the training loader, see :mod:`aa_lightning.batch`).
- media inputs (``pixel_values``, ``image_grid_thw``, ``input_features``, ...) from multimodal datamodules,
  with ``media_rows`` (the rows of each stacked media tensor that each sequence owns) and ``per_token_keys``
  (inputs of the ``(N, L)`` shape of ``input_ids``) from the multimodal collator.

Rule that keeps algorithms modality-free: every top-level tensor except ``labels`` is a model input.
The contract (key names, batch kinds, ``model_inputs``) is written down once in :mod:`aa_lightning.batch`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from aa_lightning.batch import EXTRA, IGNORE_INDEX, LABELS, META, SAMPLE_INDEX


def pad_sequences(
    sequences: Sequence[Sequence[int]], value: int, side: str = "right", multiple_of: int | None = None
) -> torch.Tensor:
    """Stack int lists into (N, L) padded with ``value`` on ``side``; L rounded up to ``multiple_of``."""
    length = max(len(s) for s in sequences)
    if multiple_of:
        length = -(-length // multiple_of) * multiple_of
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if not len(seq):
            continue
        row = torch.as_tensor(seq, dtype=torch.long)
        if side == "right":
            out[i, : len(seq)] = row
        else:
            out[i, length - len(seq) :] = row
    return out


def meta_tensors(metas: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Numeric/bool meta values present in every sample, as (B,) tensors."""
    if not metas:
        return {}
    out = {}
    for key, value in metas[0].items():
        if isinstance(value, bool) and all(isinstance(m.get(key), bool) for m in metas):
            out[key] = torch.tensor([m[key] for m in metas], dtype=torch.bool)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if all(isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool) for m in metas):
                out[key] = torch.tensor([float(m[key]) for m in metas], dtype=torch.float32)
    return out


class TextCollator:
    """Pads token lists into tensors for the three sample kinds."""

    def __init__(self, pad_token_id: int, kind: str, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.kind = kind
        self.pad_to_multiple_of = pad_to_multiple_of

    def _pad(
        self, ids: list[list[int]], labels: list[list[int]] | None, side: str
    ) -> dict[str, torch.Tensor]:
        m = self.pad_to_multiple_of
        batch = {
            "input_ids": pad_sequences(ids, self.pad_token_id, side, m),
            "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, side, m),
        }
        if labels is not None:
            batch[LABELS] = pad_sequences(labels, IGNORE_INDEX, side, m)
        return batch

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        metas = [json.loads(s["meta"]) if isinstance(s["meta"], str) else s["meta"] for s in samples]
        if self.kind == "supervised":
            batch = self._pad([s["input_ids"] for s in samples], [s["labels"] for s in samples], "right")
        elif self.kind == "preference":
            ids = [s["chosen_input_ids"] for s in samples] + [s["rejected_input_ids"] for s in samples]
            labels = [s["chosen_labels"] for s in samples] + [s["rejected_labels"] for s in samples]
            batch = self._pad(ids, labels, "right")
        elif self.kind == "prompt_only":
            batch = self._pad([s["input_ids"] for s in samples], None, "left")
        else:
            raise ValueError(f"unknown sample kind {self.kind!r}")
        batch[EXTRA] = meta_tensors(metas)
        if SAMPLE_INDEX in samples[0]:
            batch[EXTRA][SAMPLE_INDEX] = torch.tensor([s[SAMPLE_INDEX] for s in samples], dtype=torch.long)
        batch[META] = metas
        return batch
