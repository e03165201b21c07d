"""Image UNDERSTANDING rows (image + question -> answer) as plain token rows for Emu3, images pre-encoded.

The TU rows of align-anything's Any2Any files (:mod:`aa_lightning.data.formatters.any_to_any`), next to the
TG (text -> image) rows of :mod:`aa_lightning.data.text_to_image_tokens`, so one supervised batch may hold
both and SFT trains on it unchanged. A TU sequence is::

    <bos>{system} USER: <|image start|>{h}*{w}<|image token|> v v v v <eol> ... <eof><|image end|>
    {question} ASSISTANT: {answer}<eos>                                   (one sequence, wrapped here)

labelled on `` {answer}<eos>`` only: everything up to ``ASSISTANT:`` (image tokens included) and padding -100.

It is what ``Emu3Processor(text=..., images=[image])`` gives and what ``Emu3Model.forward(pixel_values=...)``
then embeds: the processor expands the ``<image>`` placeholder to the image block with ``h * (w + 1)``
placeholder tokens, and the forward replaces those by ``get_image_tokens(pixel_values)``, which are token
ids of the vocabulary (an embedding lookup, so writing the ids in place is the same input). The processor
runs here as is (its image processor sizes the image, keeping its aspect ratio; no crop: understanding sees
the whole picture) and :class:`~aa_lightning.models.image_tokens.Emu3ImageTokenizer` (the checkpoint's
frozen VQ-VAE) replaces the placeholders, once, when the data is prepared.

Why this prompt layout (Emu3-Chat's ``USER: ... ASSISTANT:``) and not the tokenizer's chat template: it is the
layout Emu3-Chat was trained on (transformers' Emu3 example renders ``You are a helpful assistant. USER:
<image>{question} ASSISTANT:`` with Emu3-Chat's chat template), it is plain text like Emu3's generation
prompt (TG rows: ``<bos>{prompt}<|image start|>...``, no template either), and it does not depend on a chat
template that generation checkpoints (Emu3-Gen) do not ship; the tiny test model's ChatML template would
make the tiny rows unlike the real ones. The answer follows ``ASSISTANT:`` after one space (the chat
template's assistant turn) and ends with the EOS token, the end of turn ``generate`` stops at.
"""

from __future__ import annotations

from typing import Any

from aa_lightning.batch import IGNORE_INDEX
from aa_lightning.data.encoding import PromptTooLongError
from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.base import Conversation
from aa_lightning.data.media import load_image, resolve_media
from aa_lightning.models.image_tokens import Emu3ImageTokenizer

__all__ = ["UnderstandingTokens", "understanding_parts"]


def understanding_parts(conversation: Conversation) -> tuple[str, str, Any, str] | None:
    """``(system, question, image item, answer)`` of a TU conversation; None when the user turn has no image
    (a TG row: its user turn is the prompt text)."""
    turns = list(conversation)
    system = ""
    if turns and turns[0].get("role") == "system":
        system = turns.pop(0).get("content") or ""
    user = turns[0].get("content") if turns and turns[0].get("role") == "user" else None
    if not isinstance(user, list) or not any(isinstance(p, dict) and p.get("type") == "image" for p in user):
        return None
    roles = [turn.get("role") for turn in turns]
    images = [p.get("image") for p in user if isinstance(p, dict) and p.get("type") == "image"]
    texts = [p.get("text") for p in user if isinstance(p, dict) and p.get("type") == "text"]
    answer = turns[-1].get("content") if roles == ["user", "assistant"] else None
    if len(images) != 1 or len(texts) != 1 or not isinstance(answer, str) or not isinstance(system, str):
        raise DataFormatError(
            "an image-understanding sample is a user turn with one image and one text and an assistant "
            f"text turn, but the formatter gave the turns {roles} with {len(images)} images and "
            f"{len(texts)} texts (use the Any2Any template)"
        )
    question = texts[0]
    if not isinstance(question, str) or not question.strip() or not answer.strip():
        raise DataFormatError(f"expected a non-empty question and answer, got {question!r} and {answer!r}")
    return system, question, images[0], answer


class UnderstandingTokens:
    """One TU conversation -> ``(input_ids, labels, image reference, question)`` in the layout of the module
    doc, the image encoded by ``image_tokenizer`` into the ids the model's forward would put there."""

    def __init__(
        self,
        processor: Any,
        image_tokenizer: Emu3ImageTokenizer,
        max_length: int,
        media_root: str | None = None,
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_tokenizer = image_tokenizer
        self.max_length = max_length
        self.media_root = media_root

    def prompt_text(self, system: str, question: str) -> str:
        """The prompt as the processor takes it (it adds the BOS and expands ``<image>``)."""
        placeholder = self.tokenizer.image_token
        if placeholder in question or placeholder in system:
            raise DataFormatError(
                f"the text holds the image placeholder {placeholder!r}; the layout places the row's image "
                "itself (remove it from the text)"
            )
        head = f"{system} " if system.strip() else ""
        return f"{head}USER: {placeholder}{question} ASSISTANT:"

    def prompt_ids(self, text: str, image: Any) -> list[int]:
        """The processor's ids for ``text`` + ``image``, the placeholders replaced by the image's tokens."""
        inputs = self.processor(text=[text], images=[image], return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        (_, _, image_ids), *_ = self.image_tokenizer.encode(inputs["pixel_values"], inputs["image_sizes"])
        slots = [i for i, token in enumerate(ids) if token == self.tokenizer.image_token_id]
        if len(slots) != len(
            image_ids
        ):  # the processor's count and the VQ-VAE's grid disagree: a bug, not data
            raise ValueError(f"{len(slots)} image placeholders for {len(image_ids)} image tokens")
        for slot, token in zip(slots, image_ids):
            ids[slot] = token
        return ids

    def sequence(self, conversation: Conversation) -> tuple[list[int], list[int], dict[str, Any], str]:
        parts = understanding_parts(conversation)
        assert parts is not None, "not an image-understanding conversation"
        system, question, item, answer = parts
        ref = resolve_media(item, "image", self.media_root, "image")
        prompt = self.prompt_ids(self.prompt_text(system, question), load_image(ref))
        tok = self.tokenizer
        target = list(tok(f" {answer}", add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        ids = prompt + target
        if len(ids) > self.max_length:
            raise PromptTooLongError(
                f"image, question and answer take {len(ids)} tokens, over max_length {self.max_length} "
                "(image tokens are never cut)"
            )
        return ids, [IGNORE_INDEX] * len(prompt) + target, ref, question
