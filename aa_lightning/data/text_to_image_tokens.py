"""Text -> image TOKENS: prompt + target image as discrete VQ tokens, for autoregressive image models (Emu3, Janus).

The rows and formatters are those of :mod:`aa_lightning.data.text_to_image` (``T2I-Prompt-Image``,
``AA_T2I``, ``Pick-a-Pic``: the same JSON files as the diffusion models). What differs is the sample: the
target image is encoded INTO TOKENS by the checkpoint's own VQ-VAE when the data is prepared, so batches are
plain token batches of the contract (:mod:`aa_lightning.batch`) and SFT / DPO / ... train on image outputs
with unchanged code (their causal-LM log-probs score image tokens like text tokens).

A supervised sequence is Emu3's image-generation layout (what ``Emu3Processor(...,
return_for_image_generation=True)`` prompts and ``generate`` then writes)::

    <bos>{prompt}<|image start|>{h}*{w}<|image token|>  v v v v <eol> ... v v v v <eol>  <eof><|image end|><eos>
    |---------------------- labels -100 ---------------|  |--------- labels = the ids (image tokens + ends) ------|

``h * (w + 1)`` image tokens (``w`` visual tokens and an end-of-line token per row, exactly
``Emu3Model.get_image_tokens``), then the end tokens; padding is -100 too. A preference row is the chosen and
the rejected image for one prompt (``2B`` rows in a batch, chosen first); a prompt-only row ends with the
image prompt, ready for ``generate``.

Why in the datamodule and not in the model: the VQ-VAE is frozen, so each image has one token sequence;
encoding it once at preparation (the LM is not loaded, only ``vqmodel.*`` weights, see
:class:`~aa_lightning.models.image_tokens.Emu3ImageTokenizer`) caches it in the ``datasets`` cache like every
other encoding, and the algorithms, the collator and the model's forward stay the text ones. The cache key
includes a hash of the VQ-VAE encoder weights. A sequence longer than ``max_length`` is dropped and counted
(cutting an image's tokens would leave a broken image).

Supervised rows may also be image UNDERSTANDING rows (image + question -> answer, the TU rows of the
``Any2Any`` template, mixed with TG rows in one file): :mod:`aa_lightning.data.image_understanding_tokens`
encodes those (input image as VQ tokens in the prompt, the answer text labelled), so a batch may hold both
kinds and stays a plain token batch.

Janus (the checkpoint's ``model_type`` picks the family, :data:`FAMILIES`) keeps its codes out of the
vocabulary, so its rows are laid out by :class:`JanusCodeEncoder`: the processor's image-generation prompt
(chat template, then ``<begin_of_image>``, as ``JanusProcessor(..., generation_mode="image")`` prompts
``generate``), then one ``<image_placeholder>`` per code in ``input_ids``; ``labels`` hold the codes (-100
on the prompt and padding) and the collator hands them to the model as ``image_codes``
(:data:`~aa_lightning.batch.IMAGE_CODES`, a per-token input). There are no end tokens: image-mode
``generate`` writes exactly ``num_image_tokens`` codes, so the image processor's output must give that grid
(checked when the data is prepared). Prompts are never dropped for classifier-free guidance (Janus's
pre-training does; its fine-tuning here trains the conditional distribution the guidance starts from).
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any

import datasets
import numpy as np

from aa_lightning.batch import IGNORE_INDEX, IMAGE_CODES, LABELS, PER_TOKEN_KEYS
from aa_lightning.data import image_understanding_tokens
from aa_lightning.data.collators import TextCollator
from aa_lightning.data.datamodule import ConversationDataModule, fingerprint_of
from aa_lightning.data.encoding import PromptTooLongError
from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.base import Conversation, Meta
from aa_lightning.data.image_understanding_tokens import UnderstandingTokens, understanding_parts
from aa_lightning.data.media import load_image, media_label, resolve_media
from aa_lightning.data.reports import SAME, DataReport
from aa_lightning.data.sources import DataSpec
from aa_lightning.data.text_to_image import PromptImageReport, TextToImageDataModule, TextToImageEncoder
from aa_lightning.models.aliases import resolve_model_path
from aa_lightning.models.image_tokens import IMAGE_TOKENIZERS, Emu3ImageTokenizer, JanusImageTokenizer
from aa_lightning.models.loading import load_tokenizer_and_processor
from aa_lightning.models.registry import load_config

__all__ = [
    "FAMILIES",
    "ImageCodeCollator",
    "ImageTokenEncoder",
    "JanusCodeEncoder",
    "TextToImageTokensDataModule",
]

EMPTY = {
    "supervised": {"input_ids": [], "labels": [], "meta": "{}"},
    "preference": {
        "chosen_input_ids": [],
        "chosen_labels": [],
        "rejected_input_ids": [],
        "rejected_labels": [],
        "meta": "{}",
    },
    "prompt_only": {"input_ids": [], "meta": "{}"},
}


class ImageTokenEncoder:
    """One formatted text-to-image row -> token columns (module doc: Emu3's layout), images encoded by
    ``image_tokenizer``; a family with another layout overrides :meth:`grid`, :meth:`prompt_ids` and
    :meth:`target`."""

    media_type = "image"  # read by the shared prompt/image reader below
    prompt_and_image = TextToImageEncoder.prompt_and_image

    def __init__(
        self,
        processor: Any,
        image_tokenizer: Any,
        resolution: int,
        max_length: int,
        media_root: str | None = None,
        source: str = "",
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_tokenizer = image_tokenizer
        self.resolution = resolution
        self.max_length = max_length
        self.media_root = media_root
        self.source = source
        self.understanding: UnderstandingTokens | None = UnderstandingTokens(
            processor, image_tokenizer, max_length, media_root
        )

    @functools.cached_property
    def end_ids(self) -> list[int]:
        """Emu3's tokens after an image: end of frame, end of image, end of sequence."""
        tok = self.tokenizer
        return tok.convert_tokens_to_ids([tok.eof_token, tok.eoi_token, tok.eos_token])

    def grid(self) -> tuple[int, int]:
        """The ``(h, w)`` token grid of a ``resolution`` x ``resolution`` image after the image processor."""
        from transformers.models.emu3.image_processing_emu3 import smart_resize

        ip = self.processor.image_processor
        side = self.resolution
        height, width = smart_resize(side, side, ip.spatial_factor, ip.min_pixels, ip.max_pixels)
        return height // self.image_tokenizer.spatial_factor, width // self.image_tokenizer.spatial_factor

    def prompt_ids(self, prompt: str, height: int, width: int) -> list[int]:
        tok = self.tokenizer
        text = f"{tok.bos_token or ''}{prompt}{tok.boi_token}{height}*{width}{tok.image_wrapper_token}"
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def image_ids(self, ref: Any) -> tuple[int, int, list[int]]:
        """The image's VQ tokens (Emu3 BPE ids, end-of-line tokens included) and its ``(h, w)`` grid."""
        from torchvision.transforms import InterpolationMode  # lazily: text-only environments lack it
        from torchvision.transforms import functional as TF  # noqa: N812

        picture = TF.resize(load_image(ref).convert("RGB"), self.resolution, InterpolationMode.BICUBIC)
        picture = TF.center_crop(picture, self.resolution)
        inputs = self.processor.image_processor([picture], return_tensors="pt")
        return self.image_tokenizer.encode(inputs["pixel_values"], inputs.get("image_sizes"))[0]

    def target(self, image_ids: list[int]) -> tuple[list[int], list[int]]:
        """``(input ids, labels)`` of the output part: Emu3's image tokens and end tokens, labelled as is."""
        target = image_ids + list(self.end_ids)
        return target, list(target)

    def sequence(self, prompt: str, image: Any) -> tuple[list[int], list[int], Any]:
        ref = resolve_media(image, "image", self.media_root, "image")
        height, width, image_ids = self.image_ids(ref)
        prompt_ids = self.prompt_ids(prompt, height, width)
        target, labels = self.target(image_ids)
        ids = prompt_ids + target
        if len(ids) > self.max_length:
            raise PromptTooLongError(
                f"prompt and image take {len(ids)} tokens, over max_length {self.max_length} (image tokens "
                "are never cut)"
            )
        return ids, [IGNORE_INDEX] * len(prompt_ids) + labels, ref

    def _meta(self, meta: Meta, prompt: str, names: Sequence[str], refs: Sequence[Any]) -> str:
        shown = {**meta, "prompt": prompt, "_source": self.source}
        shown.update({name: media_label(ref) for name, ref in zip(names, refs)})
        return json.dumps(shown)

    def supervised(self, conversation: Conversation, meta: Meta) -> dict[str, Any]:
        if understanding_parts(conversation) is not None:  # image in, text out (TU)
            if self.understanding is None:
                raise DataFormatError(
                    "an image-understanding (TU) row: this model family trains image generation only "
                    "(TU rows need an Emu3 checkpoint)"
                )
            ids, labels, ref, question = self.understanding.sequence(conversation)
            return {
                "input_ids": ids,
                "labels": labels,
                "meta": self._meta(meta, question, ["input_image"], [ref]),
            }
        prompt, image = self.prompt_and_image(conversation, "supervised")
        ids, labels, ref = self.sequence(prompt, image)
        return {"input_ids": ids, "labels": labels, "meta": self._meta(meta, prompt, ["image"], [ref])}

    def preference(self, chosen: Conversation, rejected: Conversation, meta: Meta) -> dict[str, Any]:
        prompt, chosen_image = self.prompt_and_image(chosen, "chosen")
        other, rejected_image = self.prompt_and_image(rejected, "rejected")
        if other != prompt:
            raise DataFormatError(f"the chosen and rejected prompts differ: {prompt!r} vs {other!r}")
        c_ids, c_labels, c_ref = self.sequence(prompt, chosen_image)
        r_ids, r_labels, r_ref = self.sequence(prompt, rejected_image)
        return {
            "chosen_input_ids": c_ids,
            "chosen_labels": c_labels,
            "rejected_input_ids": r_ids,
            "rejected_labels": r_labels,
            "meta": self._meta(meta, prompt, ["chosen_image", "rejected_image"], [c_ref, r_ref]),
        }

    def prompt_only(self, conversation: Conversation, meta: Meta) -> dict[str, Any]:
        prompt, _ = self.prompt_and_image(conversation, "prompt-only", with_image=False)
        height, width = self.grid()
        shown = json.loads(self._meta(meta, prompt, [], []))
        shown.update(height=height, width=width)  # the token grid generate must fill (decode needs it)
        return {"input_ids": self.prompt_ids(prompt, height, width), "meta": json.dumps(shown)}


class JanusCodeEncoder(ImageTokenEncoder):
    """Janus's layout (module doc): generation prompt, one placeholder per code; the labels are the codes."""

    image_tokenizer: JanusImageTokenizer

    def __init__(
        self, processor: Any, image_tokenizer: JanusImageTokenizer, *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(processor, image_tokenizer, *args, **kwargs)
        self.understanding = None  # Janus's understanding path is not this family's
        self.placeholder = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        height, width = image_tokenizer.grid
        self.num_codes = height * width
        # the processor resizes and pads every image to its square ``size``: one grid for all rows, checked once
        side = processor.image_processor.size["height"]
        factor = 2 ** (len(image_tokenizer.vqmodel.config.channel_multiplier) - 1)
        if (side // factor, side // factor) != (height, width):
            raise ValueError(
                f"the image processor makes {side}x{side} images, {side // factor}x{side // factor} codes, but the "
                f"VQ-VAE decodes (and the model generates) a {height}x{width} grid: the checkpoint's processor "
                "and model do not match"
            )

    def grid(self) -> tuple[int, int]:
        return self.image_tokenizer.grid

    def prompt_ids(self, prompt: str, height: int, width: int) -> list[int]:
        """What image-mode ``generate`` is prompted with: the chat template's rendering (when the processor
        has one) and ``<begin_of_image>``, tokenized by the processor (BOS as its tokenizer adds it)."""
        text = prompt
        if getattr(self.processor, "chat_template", None):
            turn = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
            text = self.processor.apply_chat_template(turn, add_generation_prompt=True)
        ids = self.processor(text=[text], generation_mode="image", return_tensors="pt")["input_ids"][0]
        return [int(i) for i in ids]

    def target(self, image_ids: list[int]) -> tuple[list[int], list[int]]:
        if len(image_ids) != self.num_codes:
            raise DataFormatError(
                f"the image gives {len(image_ids)} codes, but the VQ-VAE decodes (and the model generates) "
                f"{self.num_codes} ({self.image_tokenizer.grid} grid)"
            )
        return [self.placeholder] * len(image_ids), list(image_ids)


class ImageCodeCollator(TextCollator):
    """:class:`TextCollator` + ``image_codes`` (= the labels: codes on image positions, -100 elsewhere), a
    per-token model input for families that embed and score codes themselves (Janus)."""

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(samples)
        if LABELS in batch:
            batch[IMAGE_CODES] = batch[LABELS].clone()
            batch[PER_TOKEN_KEYS] = [IMAGE_CODES]
        return batch


#: ``config.model_type`` -> (image tokenizer, row encoder, collator) of an image-token family.
FAMILIES: dict[str, tuple[type, type[ImageTokenEncoder], type[TextCollator]]] = {
    "emu3": (IMAGE_TOKENIZERS["emu3"], ImageTokenEncoder, TextCollator),
    "janus": (IMAGE_TOKENIZERS["janus"], JanusCodeEncoder, ImageCodeCollator),
}


def _notes(kind: str, sample: dict[str, Any], formatted: Sequence[Any]) -> str:
    """Identical chosen and rejected image TOKENS carry no preference signal (counted in the report); the
    labels tell (Janus's ``input_ids`` hold placeholders, its labels the codes)."""
    same = kind == "preference" and sample["chosen_labels"] == sample["rejected_labels"]
    return SAME if same else ""


class TextToImageTokensDataModule(TextToImageDataModule):
    """Prompt + image-token rows for an autoregressive image model (Emu3, Janus; batches: the module doc).

    Takes the arguments of :class:`~aa_lightning.data.text_to_image.TextToImageDataModule`, with:

    Args:
        model_name_or_path: the Emu3 or Janus checkpoint (or ``tiny-emu3``, ``tiny-janus``): its processor
            tokenizes the prompts and its VQ-VAE (loaded alone, once) tokenizes the images; its
            ``model_type`` picks the layout (:data:`FAMILIES`).
        resolution: images are resized (shorter side) and center-cropped to ``resolution`` x ``resolution``,
            then given to the checkpoint's image processor (which may resize to its pixel bounds).
        max_length: tokens per sequence (prompt + image + end tokens); default the LM's
            ``max_position_embeddings``. Longer rows are dropped and counted.
        random_flip: not supported (an image's tokens are encoded once, when the data is prepared).

    The ``Any2Any`` template's supervised files may mix image-understanding rows (their input image is
    tokenized with its aspect ratio by the image processor, not cropped to ``resolution``) with the
    text-to-image rows.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.hparams.random_flip:
            raise ValueError(
                "random_flip: the image tokens are encoded once when the data is prepared, so there is no "
                "per-epoch augmentation; remove it"
            )
        self.image_tokenizer: Emu3ImageTokenizer | JanusImageTokenizer | None = None
        self.family = ""

    def load_processing(self) -> None:
        if self.tokenizer is not None:
            return
        if not self.hparams.model_name_or_path:
            raise ValueError("data.model_name_or_path is empty: set it (the aa CLI links it to the model's)")
        path = resolve_model_path(self.hparams.model_name_or_path)
        trust = self.hparams.trust_remote_code
        config = load_config(path, trust_remote_code=trust)
        if config.model_type not in FAMILIES:
            raise ValueError(
                f"{path}: a {config.model_type!r} checkpoint; image-token data needs one of "
                f"{', '.join(FAMILIES)} (a VQ-VAE that turns the target images into tokens)"
            )
        self.tokenizer, self.processor = load_tokenizer_and_processor(path, trust_remote_code=trust)
        if self.processor is None or not hasattr(self.processor, "image_processor"):
            raise ValueError(f"{path}: no image processor; image-token data needs the checkpoint's processor")
        self.family = config.model_type
        self.image_tokenizer = FAMILIES[self.family][0].from_pretrained(path)
        limit = config.text_config.max_position_embeddings
        self.max_length = self.hparams.max_length or limit

    def build_encoder(self) -> ImageTokenEncoder:  # type: ignore[override]
        assert self.image_tokenizer is not None
        return FAMILIES[self.family][1](
            self.processor,
            self.image_tokenizer,
            self.hparams.resolution,
            self.max_length,
            self._spec_root,
            self._spec_source,
        )

    def sample_check(self) -> Callable[[dict[str, Any]], None] | None:
        return None  # the encoder decodes (and tokenizes) every image already

    def empty_sample(self, kind: str) -> dict[str, Any]:
        return dict(EMPTY[kind])

    def new_report(self, source: str, total: int) -> DataReport:
        return PromptImageReport(source, total, self.max_length)

    def row_noter(self, encoder: Any) -> Callable[[str, dict[str, Any], Sequence[Any]], str]:
        return _notes

    def _fingerprint(self, rows: datasets.Dataset, spec: DataSpec, kind: str, formatter: Any) -> str:
        assert self.image_tokenizer is not None
        parts = {
            "base": super()._fingerprint(rows, spec, kind, formatter),  # rows, tokenizer, media checks ...
            "resolution": self.hparams.resolution,
            "image_processor": self.processor.image_processor.to_dict(),
            "vq": self.image_tokenizer.fingerprint,
            "encoder": [
                inspect.getsource(ImageTokenEncoder),
                inspect.getsource(FAMILIES[self.family][1]),
                inspect.getsource(image_understanding_tokens),
            ],
            "chat_template": getattr(self.processor, "chat_template", None),
            "notes": inspect.getsource(_notes),
        }
        return fingerprint_of(parts)

    def build_collator(self, kind: str) -> TextCollator:  # type: ignore[override]
        return FAMILIES[self.family][2](self.tokenizer.pad_token_id, kind)

    def step_tokens(self, data: datasets.Dataset) -> dict[str, np.ndarray]:
        return ConversationDataModule.step_tokens(self, data)
