"""Processor-based encoding and batching for any media: one base for the image, audio and video DataModules.

How a multimodal sample travels:

1. **Encode (cached by ``datasets``)** - :class:`MultimodalSampleEncoder` renders the conversation with the
   processor's chat template, where every media part is the family's *unexpanded* placeholder
   (``<image>``, ``<|vision_start|><|image_pad|><|vision_end|>``, ``<|audio_bos|><|AUDIO|><|audio_eos|>``),
   tokenizes it and labels assistant tokens with the text encoder itself (one code path). Media stay
   references in ``meta`` (``images``/``audios``/``videos``: paths resolved against the data file, or
   bytes); missing files and over-long audio are reported here, with file, row and column, and every
   media item is decoded once (``MultimodalDataModule.sample_check``), so a corrupt file is found too.
2. **Collate** - :class:`~aa_lightning.data.multimodal_collator.MultimodalCollator` decodes the media of the batch, calls the processor *once*
   on the rendered texts + media (which expands each placeholder to one token per media feature and
   builds ``pixel_values`` / ``input_features`` / ...), then aligns the cached labels to the expanded ids
   with :func:`~aa_lightning.data.processor_alignment.align_to_processor`: every token outside a placeholder run must agree with the cached
   token, every expanded placeholder position gets label -100.

Media tokens (placeholders and their wrappers such as ``<|vision_start|>``) are never labelled.
Preference batches pass the media twice (chosen rows, then rejected rows), so the processor output lines
up with the 2B rows. ``max_length`` counts a placeholder as one token (before expansion).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from aa_lightning.data import media as media_module
from aa_lightning.data.datamodule import ConversationDataModule, fingerprint_of
from aa_lightning.data.encoding import SampleEncoder
from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.media import MEDIA_KEYS, MediaLoader, audio_duration, resolve_media
from aa_lightning.data.multimodal_collator import MultimodalCollator
from aa_lightning.data.processor_alignment import AlignmentError, ProcessorInfo, align_to_processor
from aa_lightning.data.sources import DataSpec, media_root, source_name
from aa_lightning.data.templating import ChatRenderer

__all__ = [
    "AlignmentError",
    "MultimodalCollator",
    "MultimodalDataModule",
    "MultimodalSampleEncoder",
    "ProcessorInfo",
    "align_to_processor",
]


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
        self._spec_root = media_root(spec, self.media_root)
        self._spec_source = source_name(spec.path)
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
        return fingerprint_of(parts)


def check_media(loader: MediaLoader, sample: dict[str, Any]) -> None:
    """Decode the media of one encoded sample with the collator's loader (raises a DataFormatError)."""
    loader.check_sample(sample["meta"])
