"""Processor-based encoding and batching for any media: one base for the image, audio and video DataModules.

How a multimodal sample travels:

1. **Encode (cached by ``datasets``)** - :class:`MultimodalSampleEncoder` renders the conversation with the
   processor's chat template, where every media part is the family's *unexpanded* placeholder
   (``<image>``, ``<|vision_start|><|image_pad|><|vision_end|>``, ``<|audio_bos|><|AUDIO|><|audio_eos|>``),
   tokenizes it and labels assistant tokens with the text encoder itself (one code path). Media stay
   references in ``meta`` (``images``/``audios``/``videos``: paths resolved against the data file, or
   bytes); missing files and over-long audio are reported here, with file, row and column, and every
   media item is decoded once (``MultimodalDataModule.sample_check``), so a corrupt file is found too.
2. **Collate** - :class:`MultimodalCollator` decodes the media of the batch, calls the processor *once*
   on the rendered texts + media (which expands each placeholder to one token per media feature and
   builds ``pixel_values`` / ``input_features`` / ...), then aligns the cached labels to the expanded ids
   with :func:`align_to_processor`: every token outside a placeholder run must agree with the cached
   token, every expanded placeholder position gets label -100.

Media tokens (placeholders and their wrappers such as ``<|vision_start|>``) are never labelled.
Preference batches pass the media twice (chosen rows, then rejected rows), so the processor output lines
up with the 2B rows. ``max_length`` counts a placeholder as one token (before expansion).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from aa_lightning.batch import SAMPLE_INDEX
from aa_lightning.data import media as media_module
from aa_lightning.data.collators import meta_tensors, pad_sequences
from aa_lightning.data.datamodule import ConversationDataModule
from aa_lightning.data.encoding import (
    IGNORE_INDEX,
    SampleEncoder,
)
from aa_lightning.data.errors import SKIP_BAD_ROWS_HINT, DataFormatError
from aa_lightning.data.media import MEDIA_KEYS, MediaLoader, audio_duration, resolve_media
from aa_lightning.data.sources import DataSpec
from aa_lightning.data.templating import ChatRenderer

log = logging.getLogger(__name__)

__all__ = [
    "AlignmentError",
    "MultimodalCollator",
    "MultimodalDataModule",
    "MultimodalSampleEncoder",
    "ProcessorInfo",
    "align_to_processor",
]

# Tokens that wrap a placeholder in some families; never trained on when the tokenizer has them.
MEDIA_WRAPPER_TOKENS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<image_start>",
    "<image_end>",
    "<img>",
    "</img>",
)
# Processor argument that takes each media kind.
PROCESSOR_ARGS = {"images": "images", "audios": "audio", "videos": "videos"}


class AlignmentError(ValueError):
    """The processor's ids disagree with the cached ids outside the media placeholders."""


class ProcessorInfo:
    """What encoding and batching need to know about a processor: its placeholders and media tokens."""

    def __init__(self, processor: Any, tokenizer: Any) -> None:
        self.placeholders: dict[str, str] = {}  # meta key -> placeholder token text
        vocab = tokenizer.get_vocab()
        for key, attr in (("images", "image_token"), ("audios", "audio_token"), ("videos", "video_token")):
            token = getattr(processor, attr, None)
            if isinstance(token, str) and token in vocab:
                self.placeholders[key] = token
        self.placeholder_ids = {tokenizer.convert_tokens_to_ids(t) for t in self.placeholders.values()}
        wrappers = {vocab[t] for t in MEDIA_WRAPPER_TOKENS if t in vocab}
        self.media_token_ids = frozenset(self.placeholder_ids | wrappers)
        extractor = getattr(processor, "feature_extractor", None)
        self.sampling_rate: int | None = getattr(extractor, "sampling_rate", None)
        seconds = getattr(extractor, "chunk_length", None)
        if seconds is None and getattr(extractor, "n_samples", None) and self.sampling_rate:
            seconds = extractor.n_samples / self.sampling_rate
        self.max_audio_seconds: float | None = float(seconds) if seconds else None
        self.bos_token_id = tokenizer.bos_token_id


def align_to_processor(
    ids: Sequence[int],
    labels: Sequence[int] | None,
    processor_ids: Sequence[int],
    placeholder_ids: set[int] | frozenset[int],
    bos_token_id: int | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """Expand cached ``ids``/``labels`` to the processor's ids by run-length alignment on placeholders.

    Returns ``(ids, labels, source)``: ``source[k]`` is the processor position of output token ``k`` (-1
    for a leading BOS the processor did not add). A run of ``n`` placeholder tokens in ``ids`` takes the
    whole run (at least ``n`` long) of the same token in ``processor_ids``; those positions get -100.
    Processor tokens after the end of ``ids`` (a sample cut by ``max_length``) are ignored.
    """
    out_ids: list[int] = []
    out_labels: list[int] = []
    source: list[int] = []
    i = j = 0
    n, m = len(ids), len(processor_ids)

    def fail(reason: str) -> AlignmentError:
        lo = max(0, i - 3)
        return AlignmentError(
            f"{reason} (cached ids[{lo}:{i + 4}] = {list(ids[lo : i + 4])}, processor ids[{max(0, j - 3)}:"
            f"{j + 4}] = {list(processor_ids[max(0, j - 3) : j + 4])}). The processor tokenizes the rendered "
            "text differently from the tokenizer; check the processor's chat template and special tokens."
        )

    while i < n:
        token = ids[i]
        if token in placeholder_ids:
            end = i
            while end < n and ids[end] == token:
                end += 1
            if j >= m or processor_ids[j] != token:
                raise fail(f"placeholder token {token} at position {i} was not expanded by the processor")
            stop = j
            while stop < m and processor_ids[stop] == token:
                stop += 1
            if stop - j < end - i:
                raise fail(f"the processor has {stop - j} placeholder tokens where the text has {end - i}")
            out_ids.extend(processor_ids[j:stop])
            out_labels.extend([IGNORE_INDEX] * (stop - j))
            source.extend(range(j, stop))
            i, j = end, stop
        elif j < m and processor_ids[j] == token:
            out_ids.append(token)
            out_labels.append(labels[i] if labels is not None else IGNORE_INDEX)
            source.append(j)
            i, j = i + 1, j + 1
        elif i == 0 and bos_token_id is not None and token == bos_token_id:
            out_ids.append(token)
            out_labels.append(labels[i] if labels is not None else IGNORE_INDEX)
            source.append(-1)
            i += 1
        else:
            found = processor_ids[j] if j < m else "end of sequence"
            raise fail(f"token mismatch at position {i}: cached {token}, processor {found}")
    return out_ids, out_labels, source


class MultimodalSampleEncoder(SampleEncoder):
    """:class:`SampleEncoder` with media: it only resolves and checks the media references and names the
    media tokens (never labelled); tokens, labels, BOS and truncation are the text encoder's, unchanged.

    The rendered text stored with a sample always covers exactly its (possibly truncated) token ids, so
    the collator can hand it to the processor; media whose placeholder was cut off are left out there.
    """

    def __init__(
        self,
        tokenizer: Any,
        renderer: ChatRenderer,
        info: ProcessorInfo,
        max_length: int = 512,
        train_on: str = "all_assistant",
        media_root: str | None = None,
        source: str = "",
        modalities: Sequence[str] = tuple(MEDIA_KEYS),
        max_audio_seconds: float | None = None,
    ) -> None:
        super().__init__(tokenizer, renderer, max_length, train_on, media_token_ids=info.media_token_ids)
        self.info = info
        self.media_root = media_root
        self.source = source
        self.modalities = tuple(modalities)
        self.max_audio_seconds = (
            max_audio_seconds if max_audio_seconds is not None else info.max_audio_seconds
        )

    # -- media references --------------------------------------------------------------------------
    def prepare_meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Meta with every media list resolved to JSON-able references (and checked)."""
        meta = dict(meta)
        for key, kind in MEDIA_KEYS.items():
            items = meta.get(key)
            if items is None:
                continue
            if not isinstance(items, (list, tuple)):
                items = [items]
            if items and key not in self.modalities:
                raise DataFormatError(
                    f"the row has {kind} input but this datamodule takes {', '.join(self.modalities)} only",
                    field=key,
                )
            if items and key not in self.info.placeholders:
                raise DataFormatError(f"the model's processor takes no {kind} input", field=key)
            refs = [resolve_media(item, f"{key}[{i}]", self.media_root, kind) for i, item in enumerate(items)]
            if key == "audios" and self.max_audio_seconds:
                for ref in refs:
                    seconds = audio_duration(ref)
                    if seconds > self.max_audio_seconds + 1e-6:
                        raise DataFormatError(
                            f"audio {media_module.media_label(ref)} is {seconds:.1f} s long, more than the "
                            f"{self.max_audio_seconds:g} s the feature extractor takes (it would be cut "
                            "silently); split the clip",
                            field=ref["field"],
                        )
            meta[key] = refs
        if self.source:
            meta["_source"] = self.source
        return meta

    def check_media_count(self, text: str, meta: dict[str, Any]) -> None:
        for key, token in self.info.placeholders.items():
            found, given = text.count(token), len(meta.get(key) or [])
            if found != given:
                raise DataFormatError(
                    f"the rendered conversation has {found} {MEDIA_KEYS[key]} placeholder(s) but the row has "
                    f"{given} {MEDIA_KEYS[key]}(s); each media item needs one marker/part in the messages",
                    field=key,
                )


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

    Per-token inputs such as ``mm_token_type_ids`` have the ``(N, L)`` shape of ``input_ids`` (0 = text):
    code that appends generated tokens to a prompt-only batch pads them with zeros, as for
    ``attention_mask`` with ones.
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
        for _, _, text, loaded, _ in sequences:
            for key, token in self.info.placeholders.items():
                count = text.count(token)  # a truncated text keeps only the media whose placeholder survived
                if count:
                    media.setdefault(key, []).extend(loaded.get(key, [])[:count])
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
        kept_metas = [meta for _, meta, _ in good]
        batch["extra"] = meta_tensors(kept_metas)
        if SAMPLE_INDEX in good[0][0]:
            batch["extra"][SAMPLE_INDEX] = torch.tensor(
                [s[SAMPLE_INDEX] for s, _, _ in good], dtype=torch.long
            )
        batch["meta"] = kept_metas
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
            batch["labels"] = pad_sequences(all_labels, IGNORE_INDEX, side, m)
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


class MultimodalDataModule(ConversationDataModule):
    """Conversations with media for processor-based models (LLaVA, Qwen2-VL, Qwen2-Audio, ...).

    Args (besides those of :class:`ConversationDataModule`):
        media_root: folder that relative media paths are resolved against; default: the folder of
            each data file (or the data folder).
        processor_kwargs: extra arguments for every processor call, e.g.
            ``{"images_kwargs": {"size": {"shortest_edge": 3136, "longest_edge": 200704}}}``
            (Qwen2-VL's pixel bounds per image).
    """

    modalities: tuple[str, ...] = tuple(MEDIA_KEYS)

    def __init__(
        self,
        *args: Any,
        media_root: str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.media_root = media_root
        self.processor_kwargs = dict(processor_kwargs or {})
        self.skipped_media: list[str] = []  # collate-time media errors skipped with on_bad_row: skip
        self._spec_root: str | None = None
        self._spec_source = ""

    # -- hooks for the modality subclasses ---------------------------------------------------------
    def media_loader(self) -> MediaLoader:
        return MediaLoader(sampling_rate=self.info.sampling_rate)

    def max_audio_seconds(self) -> float | None:
        return None

    def sample_check(self) -> Callable[[dict[str, Any]], None]:
        """Decode every media item of each row when the data is prepared (cached with the encoding), so a
        corrupt or truncated file is a bad row now (an error, or skipped and counted), not in a batch."""
        return functools.partial(check_media, self.media_loader())

    # -- processing --------------------------------------------------------------------------------
    def load_processing(self) -> None:
        super().load_processing()
        if self.processor is None or not hasattr(self.processor, "tokenizer"):
            raise ValueError(
                f"{self.hparams.model_name_or_path!r} has no processor: {type(self).__name__} needs a "
                "multimodal checkpoint (e.g. tiny-llava, tiny-qwen2-vl, tiny-qwen2-audio)"
            )
        self.info = ProcessorInfo(self.processor, self.tokenizer)

    def encode_spec(self, spec: DataSpec, kind: str) -> tuple[Any, Any]:
        path = os.path.abspath(os.path.expanduser(spec.path))
        root = os.path.dirname(path) if os.path.isfile(path) else path if os.path.isdir(path) else os.getcwd()
        self._spec_root = os.path.abspath(os.path.expanduser(self.media_root)) if self.media_root else root
        self._spec_source = os.path.basename(spec.path.rstrip("/")) or spec.path
        return super().encode_spec(spec, kind)

    def build_encoder(self) -> MultimodalSampleEncoder:
        return MultimodalSampleEncoder(
            self.tokenizer,
            self.renderer,
            self.info,
            max_length=self.hparams.max_length,
            train_on=self.hparams.train_on,
            media_root=self._spec_root,
            source=self._spec_source,
            modalities=self.modalities,
            max_audio_seconds=self.max_audio_seconds(),
        )

    def build_collator(self, kind: str) -> Callable[[list[dict]], dict]:
        return MultimodalCollator(
            self.processor,
            self.info,
            kind,
            self.media_loader(),
            on_bad_row=self.hparams.on_bad_row,
            pad_to_multiple_of=self.hparams.pad_to_multiple_of,
            processor_kwargs=self.processor_kwargs,
            skipped=self.skipped_media,
        )

    def _fingerprint(self, rows: Any, spec: DataSpec, kind: str, formatter: Any) -> str:
        parts = {
            "base": super()._fingerprint(rows, spec, kind, formatter),
            "encoder": inspect.getsource(MultimodalSampleEncoder),
            "resolve": inspect.getsource(resolve_media),
            "root": self._spec_root,
            "modalities": self.modalities,
            "max_audio_seconds": self.max_audio_seconds(),
            "placeholders": self.info.placeholders,
            "media_check": [repr(self.media_loader()), inspect.getsource(media_module)],
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def check_media(loader: MediaLoader, sample: dict[str, Any]) -> None:
    """Decode the media of one encoded sample with the collator's loader (raises a DataFormatError)."""
    loader.check_sample(sample["meta"])
