"""Step 2 of the four (data preparation): conversation(s) + meta -> token ids and label masks.

One encoder (:class:`SampleEncoder`) serves every datamodule: a text row is a row without media, so text
and multimodal samples follow exactly the same labelling, BOS and end-of-turn rules.

Encoded samples are plain lists (cached by ``datasets``); the collator turns them into tensors.
Keys of one encoded sample, by kind:

- supervised:  ``input_ids``, ``labels`` (-100 outside the assistant turns), ``text``, ``meta``
- preference:  ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels``,
  ``chosen_text``, ``rejected_text``, ``meta``
- prompt_only: ``input_ids`` (the prompt with the generation prompt), ``prompt_text``, ``meta``

``meta`` is stored as JSON (a row's meta dict from its formatter): media references, reference answers,
safety labels, margins.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

import numpy as np

from aa_lightning.batch import IGNORE_INDEX, SAMPLE_KINDS, SampleKind  # noqa: F401 (re-exported: old import path)
from aa_lightning.data.templating import ChatRenderer, Conversation

EMPTY_SAMPLES: dict[str, dict[str, Any]] = {
    "supervised": {"input_ids": [], "labels": [], "text": "", "meta": "{}"},
    "preference": {
        "chosen_input_ids": [],
        "chosen_labels": [],
        "rejected_input_ids": [],
        "rejected_labels": [],
        "chosen_text": "",
        "rejected_text": "",
        "meta": "{}",
    },
    "prompt_only": {"input_ids": [], "prompt_text": "", "meta": "{}"},
}
"""Placeholders for rows that are dropped (every row of a ``datasets.map`` needs the same columns)."""


class PromptTooLongError(ValueError):
    """The prompt leaves no room in ``max_length``: it fills every position a response token would need, or
    (prompt-only rows) is longer than ``max_length`` itself. The row cannot train anything and is dropped."""


#: The old name, kept for code that catches it.
ResponseTruncatedError = PromptTooLongError


class SampleEncoder:
    """The one encoder of every datamodule: renders conversations with the chat template, tokenizes them
    and labels the assistant turns. Text rows are rows without media; :class:`MultimodalSampleEncoder`
    only adds the media hooks (``prepare_meta``, ``check_media_count``) and the media token ids.

    Rules, the same for every modality and sample kind:

    - a token is labelled when it overlaps an assistant span (a token that straddles the start of the
      response, as ``" Hello"`` after ``"ASSISTANT: "``, carries response text the model has to produce);
      media tokens never are;
    - spans end at the template's end-of-turn token (see :meth:`ChatRenderer.render_with_spans`), so the
      last token of a trained row is where rollouts stop and where score models read the end score;
    - a tokenizer that adds BOS gets it on every row (supervised, preference and prompt-only alike), as
      ``generate`` and the score model see it.
    """

    def __init__(
        self,
        tokenizer: Any,
        renderer: ChatRenderer,
        max_length: int = 512,
        train_on: str = "all_assistant",
        media_token_ids: Collection[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.renderer = renderer
        self.max_length = max_length
        self.train_on = train_on
        self.media_token_ids = np.asarray(sorted(media_token_ids), dtype=np.int64)
        self.bos_token_id = tokenizer.bos_token_id if adds_bos(tokenizer) else None

    # -- media hooks (text rows have none) ---------------------------------------------------------
    def prepare_meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The row's meta as stored; the multimodal encoder resolves and checks media references here."""
        return dict(meta)

    def check_media_count(self, text: str, meta: dict[str, Any]) -> None:
        """Raise when the rendered text and the row's media disagree (nothing to check without media)."""

    # -- tokens ------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and their character offsets, with BOS first when the tokenizer adds one."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = [(int(start), int(end)) for start, end in enc["offset_mapping"]]
        bos = self.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):  # a template that renders BOS already has it
            ids, offsets = [bos, *ids], [(0, 0), *offsets]
        return ids, offsets

    def label(
        self, ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
    ) -> list[int]:
        """The id of every token that overlaps a span and is no media token, else -100."""
        token_ids = np.asarray(ids, dtype=np.int64)
        bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        starts, ends = bounds[:, 0], bounds[:, 1]
        inside = np.zeros(len(ids), dtype=bool)
        for lo, hi in spans:
            inside |= (ends > lo) & (starts < hi)
        inside &= ~np.isin(token_ids, self.media_token_ids)
        return np.where(inside, token_ids, IGNORE_INDEX).tolist()

    def encode_conversation(
        self, conversation: Conversation, meta: dict[str, Any] | None = None
    ) -> tuple[list[int], list[int], str]:
        """``(ids, labels, text)`` of a whole conversation; ``text`` covers exactly the (cut) ``ids``."""
        text, spans = self.renderer.render_with_spans(conversation, train_on=self.train_on)
        self.check_media_count(text, meta or {})
        ids, offsets = self.tokenize(text)
        labels = self.label(ids, offsets, spans)
        if len(ids) > self.max_length:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            text = text[: offsets[self.max_length - 1][1]]  # the collator hands this text to the processor
        if all(label == IGNORE_INDEX for label in labels):
            raise PromptTooLongError(
                f"the prompt fills max_length={self.max_length} tokens, so no response token is left"
            )
        return ids, labels, text

    # -- the three sample kinds --------------------------------------------------------------------
    def supervised(self, conversation: Conversation, meta: dict) -> dict[str, Any]:
        meta = self.prepare_meta(meta)
        ids, labels, text = self.encode_conversation(conversation, meta)
        return {"input_ids": ids, "labels": labels, "text": text, "meta": dump_meta(meta)}

    def preference(self, chosen: Conversation, rejected: Conversation, meta: dict) -> dict[str, Any]:
        meta = self.prepare_meta(meta)
        return preference_record(
            self.encode_conversation(chosen, meta), self.encode_conversation(rejected, meta), meta
        )

    def prompt_only(self, conversation: Conversation, meta: dict) -> dict[str, Any]:
        meta = self.prepare_meta(meta)
        if conversation and conversation[-1]["role"] == "assistant":
            conversation = conversation[:-1]
        text = self.renderer.render(conversation, add_generation_prompt=True)
        self.check_media_count(text, meta)
        ids, _ = self.tokenize(text)
        if len(ids) > self.max_length:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens, more than max_length={self.max_length}"
            )
        meta = {**meta, "prompt": conversation}
        return {"input_ids": ids, "prompt_text": text, "meta": dump_meta(meta)}


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS first when it encodes text (``add_bos_token``, or a post-processor
    as Llama-3's): such a model has always seen BOS first, so every encoded row starts with it."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    if getattr(tokenizer, "add_bos_token", False):
        return True
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def preference_record(
    chosen: tuple[list[int], list[int], str], rejected: tuple[list[int], list[int], str], meta: dict
) -> dict[str, Any]:
    """The encoded preference sample from the (ids, labels, text) of both conversations."""
    (c_ids, c_labels, c_text), (r_ids, r_labels, r_text) = chosen, rejected
    return {
        "chosen_input_ids": c_ids,
        "chosen_labels": c_labels,
        "rejected_input_ids": r_ids,
        "rejected_labels": r_labels,
        "chosen_text": c_text,
        "rejected_text": r_text,
        "meta": dump_meta(meta),
    }


def dump_meta(meta: dict) -> str:
    """Meta as JSON; values JSON cannot hold (PIL images, arrays) are dropped with their key kept as None."""
    return json.dumps(meta, default=lambda _: None)
