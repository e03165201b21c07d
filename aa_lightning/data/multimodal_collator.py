"""Collation of multimodal batches: decode the media, run the processor once, align the cached labels.

The batch follows the contract of :mod:`aa_lightning.batch`, layout keys included: the processor's
per-token inputs are listed in ``PER_TOKEN_KEYS`` and the rows each sequence owns in every media tensor that
is not one row a sequence in ``MEDIA_ROWS`` (:mod:`aa_lightning.data.media_rows`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from aa_lightning.batch import EXTRA, IGNORE_INDEX, LABELS, MEDIA_ROWS, META, PER_TOKEN_KEYS, SAMPLE_INDEX
from aa_lightning.data.collators import meta_tensors, pad_sequences
from aa_lightning.data.errors import SKIP_BAD_ROWS_HINT, DataFormatError
from aa_lightning.data.media import MediaLoader
from aa_lightning.data.media_rows import media_rows_per_sequence
from aa_lightning.data.processor_alignment import AlignmentError, ProcessorInfo, align_to_processor

log = logging.getLogger(__name__)

__all__ = ["PROCESSOR_ARGS", "MultimodalCollator"]

# Processor argument that takes each media kind.
PROCESSOR_ARGS = {"images": "images", "audios": "audio", "videos": "videos"}


class MultimodalCollator:
    """Decodes media, runs the processor once per batch and aligns the cached labels (see module doc).

    Batch keys: ``input_ids``/``attention_mask`` (+ ``labels``), the processor's per-token inputs
    (``mm_token_type_ids`` for Qwen2-VL) aligned the same way, the processor's media tensors
    (``pixel_values``, ``image_grid_thw``, ``input_features``, ``feature_attention_mask``,
    ``pixel_values_videos``, ``video_grid_thw`` ...), ``extra`` and ``meta`` as in the text collator.

    Media were decoded once when the data was prepared, so this only happens to a file changed since: a
    sample whose media cannot be decoded raises a :class:`DataFormatError` naming data file, row, column
    and media file, or with ``on_bad_row="skip"`` is left out of the batch, logged with the running count
    and recorded in ``skipped`` (the datamodule's ``skipped_media``; with ``num_workers > 0`` each worker
    counts its own).

    Per-token inputs such as ``mm_token_type_ids`` have the ``(N, L)`` shape of ``input_ids`` (0 = text) and
    are listed in ``batch[PER_TOKEN_KEYS]``: code that appends generated tokens to a prompt-only batch pads
    them with zeros, as for ``attention_mask`` with ones. Media tensors stacked per item or patch get the
    rows of each sequence in ``batch[MEDIA_ROWS]``, so a batch can be repeated or split by sequence.
    """

    def __init__(
        self,
        processor: Any,
        info: ProcessorInfo,
        kind: str,
        loader: MediaLoader,
        on_bad_row: str = "error",
        pad_to_multiple_of: int | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        skipped: list[str] | None = None,
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.info = info
        self.kind = kind
        self.loader = loader
        self.on_bad_row = on_bad_row
        self.pad_to_multiple_of = pad_to_multiple_of
        self.processor_kwargs = dict(processor_kwargs or {})
        self.skipped: list[str] = skipped if skipped is not None else []
        names = set(getattr(self.tokenizer, "model_input_names", ())) | {
            "token_type_ids",
            "mm_token_type_ids",
        }
        self.per_token_keys = names - {"input_ids", "attention_mask"}
        self.text_keys = frozenset(names | {"input_ids", "attention_mask"})

    def _load(self, samples: list[dict[str, Any]], metas: list[dict[str, Any]]) -> list[tuple]:
        good = []
        for sample, meta in zip(samples, metas):
            try:
                loaded = self.loader.load_sample(meta)
            except DataFormatError as err:
                err.with_location(source=meta.get("_source"), row=sample.get("_row"))
                if self.on_bad_row != "skip":
                    err.hint = err.hint or SKIP_BAD_ROWS_HINT
                    raise
                self.skipped.append(str(err))
                log.warning(
                    "skipping a sample whose media cannot be decoded in the collator (%d so far): %s",
                    len(self.skipped),
                    err,
                )
                continue
            good.append((sample, meta, loaded))
        if not good:
            raise DataFormatError(
                f"every sample of the batch had media that cannot be decoded (last: {self.skipped[-1]})"
            )
        return good

    def _sequences(self, good: list[tuple]) -> list[tuple[list[int], list[int] | None, str, dict, dict]]:
        if self.kind == "supervised":
            return [(s["input_ids"], s["labels"], s["text"], loaded, s) for s, _, loaded in good]
        if self.kind == "preference":
            chosen = [
                (s["chosen_input_ids"], s["chosen_labels"], s["chosen_text"], lo, s) for s, _, lo in good
            ]
            rejected = [
                (s["rejected_input_ids"], s["rejected_labels"], s["rejected_text"], lo, s)
                for s, _, lo in good
            ]
            return chosen + rejected
        if self.kind == "prompt_only":
            return [(s["input_ids"], None, s["prompt_text"], loaded, s) for s, _, loaded in good]
        raise ValueError(f"unknown sample kind {self.kind!r}")

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        metas = [json.loads(s["meta"]) if isinstance(s["meta"], str) else s["meta"] for s in samples]
        good = self._load(samples, metas)
        sequences = self._sequences(good)
        texts = [text for _, _, text, _, _ in sequences]
        media: dict[str, list[Any]] = {}
        counts: dict[str, list[int]] = {key: [] for key in self.info.placeholders}  # items per sequence
        for _, _, text, loaded, _ in sequences:
            for key, token in self.info.placeholders.items():
                count = text.count(token)  # a truncated text keeps only the media whose placeholder survived
                items = loaded.get(key, [])[:count]
                counts[key].append(len(items))
                if items:
                    media.setdefault(key, []).extend(items)
        kwargs: dict[str, Any] = {PROCESSOR_ARGS[key]: items for key, items in media.items()}
        if "audios" in media and self.info.sampling_rate:
            kwargs["sampling_rate"] = self.info.sampling_rate
        out = self.processor(
            text=texts,
            padding=True,
            return_tensors="pt",
            add_special_tokens=False,
            **kwargs,
            **self.processor_kwargs,
        )
        batch = self._align(sequences, out)
        # always stated (even empty): readers never fall back to guessing per-token inputs by shape
        batch[PER_TOKEN_KEYS] = [key for key in batch if key in self.per_token_keys]
        rows = media_rows_per_sequence(
            out, {k: c for k, c in counts.items() if k in media}, len(sequences), skip=self.text_keys
        )
        if rows:
            batch[MEDIA_ROWS] = rows
        kept_metas = [meta for _, meta, _ in good]
        batch[EXTRA] = meta_tensors(kept_metas)
        if SAMPLE_INDEX in good[0][0]:
            batch[EXTRA][SAMPLE_INDEX] = torch.tensor([s[SAMPLE_INDEX] for s, _, _ in good], dtype=torch.long)
        batch[META] = kept_metas
        return batch

    def _align(self, sequences: list[tuple], out: Any) -> dict[str, Any]:
        side = "left" if self.kind == "prompt_only" else "right"
        mask = out["attention_mask"].bool()
        all_ids, all_labels, sources = [], [], []
        for b, (ids, labels, _, _, sample) in enumerate(sequences):
            processor_ids = out["input_ids"][b][mask[b]].tolist()
            try:
                aligned = align_to_processor(
                    ids, labels, processor_ids, self.info.placeholder_ids, self.info.bos_token_id
                )
            except AlignmentError as err:
                meta = json.loads(sample["meta"]) if isinstance(sample["meta"], str) else sample["meta"]
                where = f"{meta.get('_source', 'data')}, row {sample.get('_row', '?')}"
                raise AlignmentError(f"{where}: {err}") from None
            all_ids.append(aligned[0])
            all_labels.append(aligned[1])
            sources.append(aligned[2])
        m = self.pad_to_multiple_of
        batch: dict[str, Any] = {
            "input_ids": pad_sequences(all_ids, self.tokenizer.pad_token_id, side, m),
            "attention_mask": pad_sequences([[1] * len(s) for s in all_ids], 0, side, m),
        }
        if self.kind != "prompt_only":
            batch[LABELS] = pad_sequences(all_labels, IGNORE_INDEX, side, m)
        for key, value in out.items():
            if key in ("input_ids", "attention_mask") or not isinstance(value, torch.Tensor):
                continue
            if key in self.per_token_keys:
                rows = []
                for b, source in enumerate(sources):
                    row = value[b][mask[b]]
                    index = torch.as_tensor(source, dtype=torch.long)
                    rows.append(torch.where(index >= 0, row[index.clamp(min=0)], 0).tolist())
                batch[key] = pad_sequences(rows, 0, side, m).to(value.dtype)
            else:
                batch[key] = value
        return batch
