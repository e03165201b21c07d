"""Step 2 of the four (data preparation): conversation(s) + meta -> token ids and label masks.

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
from typing import Any, Literal

import numpy as np

from aa_lightning.data.templating import ChatRenderer, Conversation

SampleKind = Literal["supervised", "preference", "prompt_only"]
SAMPLE_KINDS = ("supervised", "preference", "prompt_only")
IGNORE_INDEX = -100


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


class ResponseTruncatedError(ValueError):
    """The response would be cut off entirely by ``max_length`` (the row cannot train anything)."""


class SampleEncoder:
    """Renders conversations with the chat template and tokenizes them, labelling assistant tokens only."""

    def __init__(
        self,
        tokenizer: Any,
        renderer: ChatRenderer,
        max_length: int = 512,
        train_on: str = "all_assistant",
    ) -> None:
        self.tokenizer = tokenizer
        self.renderer = renderer
        self.max_length = max_length
        self.train_on = train_on

    def tokenize_with_spans(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` and labels: the id where the token overlaps a span, else -100."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        inside = np.zeros(len(ids), dtype=bool)
        for lo, hi in spans:
            # a token is trained on when it overlaps an assistant span: a token that straddles the start
            # (" Hello" after "ASSISTANT:") carries response text the model has to produce
            inside |= (ends > lo) & (starts < hi)
        labels = np.where(inside, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()
        bos = self.tokenizer.bos_token_id
        if bos is not None and getattr(self.tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
            ids, labels = [bos, *ids], [IGNORE_INDEX, *labels]
        return ids, labels

    def encode_conversation(self, conversation: Conversation) -> tuple[list[int], list[int], str]:
        text, spans = self.renderer.render_with_spans(conversation, train_on=self.train_on)
        ids, labels = self.tokenize_with_spans(text, spans)
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise ResponseTruncatedError(
                f"the prompt fills max_length={self.max_length} tokens, so no response token is left"
            )
        return ids, labels, text

    def supervised(self, conversation: Conversation, meta: dict) -> dict[str, Any]:
        ids, labels, text = self.encode_conversation(conversation)
        return {"input_ids": ids, "labels": labels, "text": text, "meta": dump_meta(meta)}

    def preference(self, chosen: Conversation, rejected: Conversation, meta: dict) -> dict[str, Any]:
        return preference_record(self.encode_conversation(chosen), self.encode_conversation(rejected), meta)

    def prompt_only(self, conversation: Conversation, meta: dict) -> dict[str, Any]:
        if conversation and conversation[-1]["role"] == "assistant":
            conversation = conversation[:-1]
        text = self.renderer.render(conversation, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_length:
            raise ResponseTruncatedError(
                f"the prompt has {len(ids)} tokens, more than max_length={self.max_length}"
            )
        meta = {**meta, "prompt": conversation}
        return {"input_ids": list(ids), "prompt_text": text, "meta": dump_meta(meta)}


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
