"""Text -> image (t2i): prompt + image rows for diffusion models (SFT on images, Diffusion-DPO on image pairs).

The conversation machinery of :class:`~aa_lightning.data.datamodule.ConversationDataModule` carries over
unchanged: data specs, formatters by template name, the ``datasets`` cache, bad rows named by file, row and
column when the data is prepared (every image decoded once), ``on_bad_row: skip``, the resumable training
loader. What differs is what a sample is: :class:`TextToImageEncoder` keeps the prompt's tokens (the
pipeline tokenizer's, cut to its ``model_max_length``) and references to the images instead of a chat
rendering with labels, and :class:`~aa_lightning.data.text_to_image_collator.TextToImageCollator` decodes,
resizes and crops the images into ``pixel_values`` and draws each row's ``noise_seed``.

A diffusion loss scores a whole image, so every row is one scored unit: the step counts of training batches
(``STEP_LABEL_TOKENS``, see :mod:`aa_lightning.batch`) count rows.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import datasets
import numpy as np

from aa_lightning.batch import STEP_CHOSEN_LABEL_TOKENS, STEP_LABEL_TOKENS
from aa_lightning.data import media as media_module
from aa_lightning.data.datamodule import ConversationDataModule, fingerprint_of, formatter_source
from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.base import Conversation, Meta
from aa_lightning.data.media import MediaLoader, resolve_media
from aa_lightning.data.multimodal import check_media
from aa_lightning.data.noise_seeds import NoiseSeedsPerEpoch
from aa_lightning.data.reports import CUT, SAME, DataReport
from aa_lightning.data.sources import DataSpec, media_root, source_name
from aa_lightning.data.text_to_image_collator import TextToImageCollator
from aa_lightning.models.aliases import resolve_model_path
from aa_lightning.models.loading import load_tokenizer_and_processor

__all__ = ["PromptImageReport", "TextToImageDataModule", "TextToImageEncoder", "tokenizer_folder"]

_NO_LIMIT = 10**6  # transformers' "no model_max_length" is VERY_LARGE_INTEGER (1e30)
#: Arguments of :class:`ConversationDataModule` that have no meaning for prompt + image rows.
CHAT_ONLY = ("train_on", "on_truncated", "pad_to_multiple_of", "group_by_length", "ptx", "ptx_batch_size")


def tokenizer_folder(path: str) -> str:
    """Where a model's tokenizer lives: a diffusers pipeline folder's ``tokenizer/``, or ``path`` itself."""
    sub = os.path.join(path, "tokenizer")
    return sub if os.path.isdir(sub) else path


class TextToImageEncoder:
    """One formatted text-to-image row -> its cached columns (the role of ``SampleEncoder`` for chat rows).

    Columns of every kind: ``input_ids`` (the prompt's tokens, at most ``max_length``), ``prompt`` and
    ``meta`` (JSON: the formatter's meta, ``images`` = the image references in :data:`IMAGE_SIDES
    <aa_lightning.data.text_to_image_collator.IMAGE_SIDES>` order, ``_source`` = the data file). Paths are
    resolved against ``media_root`` and must exist; decoding is the datamodule's sample check.
    """

    #: the generated media: the content part's type, its meta key, the templates that give it
    media_type = "image"
    meta_key = "images"
    templates = "T2I-Prompt-Image, Pick-a-Pic, AA_T2I"

    def __init__(
        self, tokenizer: Any, max_length: int, media_root: str | None = None, source: str = ""
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.media_root = media_root
        self.source = source

    def tokens(self, prompt: str, max_length: int | None = None) -> list[int]:
        limit = max_length or self.max_length
        return list(self.tokenizer(prompt, truncation=True, max_length=limit)["input_ids"])

    def is_cut(self, sample: dict[str, Any]) -> bool:
        """Whether ``max_length`` cut the sample's prompt (only a prompt that fills it is encoded again)."""
        if len(sample["input_ids"]) < self.max_length:
            return False
        return len(self.tokens(sample["prompt"], self.max_length + 1)) > self.max_length

    def prompt_and_image(
        self, conversation: Conversation, side: str, with_image: bool = True
    ) -> tuple[str, Any]:
        """The prompt and the media of ``[user: prompt, assistant: [media part]]`` (``side`` names it)."""
        kind = self.media_type
        roles = [message.get("role") for message in conversation]
        expected = ["user", "assistant"] if with_image else ["user"]
        parts = conversation[-1].get("content") if with_image and roles == expected else None
        images = [p.get(kind) for p in parts or () if isinstance(p, dict) and p.get("type") == kind]
        if roles != expected or (with_image and (len(images) != 1 or images[0] is None)):
            what = (
                f"a prompt (user turn) and one {kind} (assistant turn)"
                if with_image
                else "a prompt (user turn)"
            )
            raise DataFormatError(
                f"a text-to-{kind} {side} sample is {what}, but the formatter gave the turns {roles} (use a "
                f"text-to-{kind} template: {self.templates})"
            )
        prompt = conversation[0]["content"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataFormatError(f"expected a non-empty prompt text, got {prompt!r}")
        return prompt, images[0] if with_image else None

    def _encode(self, prompt: str, images: Sequence[Any], meta: Meta) -> dict[str, Any]:
        ids = self.tokens(prompt)
        if not ids:
            raise DataFormatError(f"the prompt {prompt!r} has no tokens")
        kind = self.media_type
        refs = [resolve_media(image, kind, self.media_root, kind) for image in images]
        stored = {**meta, self.meta_key: refs, "_source": self.source}
        return {"input_ids": ids, "prompt": prompt, "meta": json.dumps(stored)}

    def supervised(self, conversation: Conversation, meta: Meta) -> dict[str, Any]:
        prompt, image = self.prompt_and_image(conversation, "supervised")
        return self._encode(prompt, [image], meta)

    def preference(self, chosen: Conversation, rejected: Conversation, meta: Meta) -> dict[str, Any]:
        prompt, chosen_image = self.prompt_and_image(chosen, "chosen")
        other, rejected_image = self.prompt_and_image(rejected, "rejected")
        if other != prompt:
            raise DataFormatError(f"the chosen and rejected prompts differ: {prompt!r} vs {other!r}")
        return self._encode(prompt, [chosen_image, rejected_image], meta)

    def prompt_only(self, conversation: Conversation, meta: Meta) -> dict[str, Any]:
        prompt, _ = self.prompt_and_image(conversation, "prompt-only", with_image=False)
        return self._encode(prompt, [], meta)


class PromptImageReport(DataReport):
    """:class:`DataReport` worded for prompts and images."""

    cut_short_note = "the text encoder never sees the ends of their prompts"
    identical_note = "preference pairs have the same chosen and rejected image and carry no signal"


def _same_images(sample: dict[str, Any]) -> bool:
    meta = json.loads(sample["meta"])
    refs = meta.get("images") or meta.get("videos") or []
    return len(refs) == 2 and {k: v for k, v in refs[0].items() if k != "field"} == {
        k: v for k, v in refs[1].items() if k != "field"
    }


def _notes(encoder: TextToImageEncoder, kind: str, sample: dict[str, Any], formatted: Sequence[Any]) -> str:
    notes = [CUT] if encoder.is_cut(sample) else []
    if kind == "preference" and _same_images(sample):
        notes.append(SAME)
    return " ".join(notes)


class TextToImageDataModule(NoiseSeedsPerEpoch, ConversationDataModule):
    """Prompt + image rows for a text-to-image diffusion model (batches: see the collator's module doc).

    Takes the arguments of :class:`ConversationDataModule` except its chat-only ones (:data:`CHAT_ONLY`), and:

    Args:
        model_name_or_path: the pipeline (a diffusers folder with ``tokenizer/``, an alias such as ``tiny-sd``)
            or a tokenizer folder; its tokenizer encodes the prompts.
        train, val, test, predict: data specs with a text-to-image template (``T2I-Prompt-Image``,
            ``Pick-a-Pic``, ``AA_T2I``); image paths are relative to the data file (or ``media_root``).
        kind: ``auto`` asks the LightningModule (``data_kind``); ``supervised`` (one image per prompt) or
            ``preference`` (chosen and rejected image). The predict split is prompt-only.
        resolution: images are resized (shorter side) and center-cropped to ``resolution`` x ``resolution``.
        random_flip: flip training images left-right with probability 0.5 (a pair's two images alike).
        max_length: prompt tokens; default the tokenizer's ``model_max_length`` (the text encoder's length).
            Longer prompts are cut and counted in the data report.
        batch_size / eval_batch_size: prompts per device; preference batches hold 2 x batch_size images.
        on_bad_row: ``error`` raises naming file, row and column (missing or undecodable image, missing
            prompt, bad label); ``skip`` drops and counts such rows. Ties of Pick-a-Pic are always left out
            and counted.
        seed: shuffling seed (the order depends only on seed and epoch, so resume is exact).
    """

    def __init__(
        self,
        *args: Any,
        resolution: int = 512,
        random_flip: bool = False,
        max_length: int | None = None,
        media_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, max_length=max_length, **kwargs)  # type: ignore[misc, arg-type]
        defaults = inspect.signature(ConversationDataModule.__init__).parameters
        chat_only = [name for name in CHAT_ONLY if self.hparams.get(name) != defaults[name].default]
        if chat_only:
            raise TypeError(
                f"{', '.join(chat_only)}: chat-data settings that {type(self).__name__} does not take (its rows "
                "are prompts and images: no assistant turns, one padded length)"
            )
        if resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        self.media_root = media_root
        self.max_length = 0  # set with the tokenizer
        self._spec_root: str | None = None
        self._spec_source = ""

    # -- tokenizer ---------------------------------------------------------------------------------------
    def load_processing(self) -> None:
        if self.tokenizer is not None:
            return
        if not self.hparams.model_name_or_path:
            raise ValueError("data.model_name_or_path is empty: set it (the aa CLI links it to the model's)")
        folder = tokenizer_folder(resolve_model_path(self.hparams.model_name_or_path))
        self.tokenizer, _ = load_tokenizer_and_processor(
            folder, trust_remote_code=self.hparams.trust_remote_code
        )
        limit = self.tokenizer.model_max_length if 0 < self.tokenizer.model_max_length < _NO_LIMIT else None
        self.max_length = self.hparams.max_length or limit or 0
        if not self.max_length:
            raise ValueError(
                f"{folder}: the tokenizer states no model_max_length (the prompt length the text encoder "
                "takes); set data.max_length"
            )
        if limit is not None and self.max_length > limit:
            raise ValueError(
                f"data.max_length {self.max_length}: the text encoder takes at most {limit} tokens"
            )

    # -- encoding ----------------------------------------------------------------------------------------
    def encode_spec(self, spec: DataSpec, kind: str) -> tuple[datasets.Dataset, DataReport]:
        self._spec_root = media_root(spec, self.media_root)
        self._spec_source = source_name(spec.path)
        return super().encode_spec(spec, kind)

    def build_encoder(self) -> TextToImageEncoder:  # type: ignore[override]
        return TextToImageEncoder(self.tokenizer, self.max_length, self._spec_root, self._spec_source)

    def sample_check(self) -> Callable[[dict[str, Any]], None]:
        """Decode every image of each row when the data is prepared, so a corrupt file is a bad row now."""
        return functools.partial(check_media, MediaLoader())

    def empty_sample(self, kind: str) -> dict[str, Any]:
        return {"input_ids": [], "prompt": "", "meta": "{}"}

    def new_report(self, source: str, total: int) -> DataReport:
        return PromptImageReport(source, total, self.max_length)

    def row_noter(self, encoder: Any) -> Callable[[str, dict[str, Any], Sequence[Any]], str]:
        return functools.partial(_notes, encoder)

    def _fingerprint(self, rows: datasets.Dataset, spec: DataSpec, kind: str, formatter: Any) -> str:
        tokenizer = self.tokenizer
        parts = {
            "rows": rows._fingerprint,
            "spec": spec.__dict__,
            "kind": kind,
            "formatter": formatter_source(formatter),
            "max_length": self.max_length,
            "on_bad_row": self.hparams.on_bad_row,
            "tokenizer": [tokenizer.name_or_path, len(tokenizer), type(tokenizer).__name__],
            "encoder": inspect.getsource(TextToImageEncoder),
            "notes": [inspect.getsource(_notes), inspect.getsource(_same_images)],
            "root": self._spec_root,
            "media": inspect.getsource(media_module),  # resolving and checking images
            "version": 1,
        }
        return fingerprint_of(parts)

    # -- batches -----------------------------------------------------------------------------------------
    def build_collator(self, kind: str) -> TextToImageCollator:
        return TextToImageCollator(
            kind,
            self.tokenizer.pad_token_id,
            self.max_length,
            self.hparams.resolution,
            random_flip=self.hparams.random_flip,
            padding_side=self.tokenizer.padding_side,
        )

    def _eval_loader(self, split: str) -> Any:
        loader = super()._eval_loader(split)
        loader.collate_fn.random_flip = False  # augmentation is for training; evaluation sees the images
        return loader

    def step_tokens(self, data: datasets.Dataset) -> dict[str, np.ndarray]:
        """One scored unit per image: ``B`` per supervised batch, ``2B`` (``B`` chosen) per preference batch."""
        rows = np.ones(len(data), dtype=np.int64)
        if self.kind == "preference":
            return {STEP_LABEL_TOKENS: 2 * rows, STEP_CHOSEN_LABEL_TOKENS: rows}
        return {STEP_LABEL_TOKENS: rows} if self.kind == "supervised" else {}
