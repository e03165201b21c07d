"""Formatters for text preference datasets that store each side as a full conversation: UltraFeedback, HH-RLHF.

Both must check that chosen and rejected share their prompt, which :meth:`ChatFormatter.shared_prompt` does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.base import Conversation, Meta
from aa_lightning.data.formatters.chat import ChatFormatter, _snippet
from aa_lightning.data.formatters.registry import register_template

__all__ = ["HHRLHF", "UltraFeedback"]


@register_template("UltraFeedback")
class UltraFeedback(ChatFormatter):
    """UltraFeedback-binarized rows: ``prompt`` plus ``chosen``/``rejected`` full message lists.

    ``chosen`` and ``rejected`` include the user turn and must differ only in the final assistant turn.
    Meta: preference ``{}`` + ``score_chosen``/``score_rejected`` (floats) when present (+ ``margin``);
    supervised ``{}`` (trains on ``chosen``); prompt-only ``{"reference": chosen reply}`` when ``chosen``
    is present.
    """

    def format_preference_sample(
        self, raw_sample: Mapping[str, Any]
    ) -> tuple[Conversation, Conversation, Meta]:
        chosen = self.parse_messages(self.field(raw_sample, "chosen", kind=list), "chosen")
        rejected = self.parse_messages(self.field(raw_sample, "rejected", kind=list), "rejected")
        self.shared_prompt(chosen, rejected)
        meta = self.preference_meta(raw_sample)
        for key in ("score_chosen", "score_rejected"):
            score = self.optional_field(raw_sample, key, kind=(int, float))
            if score is not None:
                meta[key] = float(score)
        return self.with_system(chosen), self.with_system(rejected), meta

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        chosen = self.parse_messages(self.field(raw_sample, "chosen", kind=list), "chosen")
        self.require_last_assistant(chosen, "chosen", "supervised training")
        return self.with_system(chosen), {}

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        prompt = self.field(raw_sample, "prompt")
        meta: Meta = {}
        if raw_sample.get("chosen") is not None:
            chosen = self.parse_messages(self.field(raw_sample, "chosen", kind=list), "chosen", True)
            _, reference = self.split_reference(chosen)
            if reference:
                meta["reference"] = reference
        return self.with_system([{"role": "user", "content": prompt}]), meta


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@register_template("HH-RLHF")
class HHRLHF(ChatFormatter):
    """Anthropic HH-RLHF rows ``{chosen, rejected}``, each a whole ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``.

    Transcripts are split on the ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` markers and turn text is stripped.
    Consecutive turns by the same speaker (a known quirk of the raw data) are merged with a blank line so
    the result alternates. The pair must share every turn but the final assistant reply; otherwise a
    :class:`DataFormatError` shows the first differing turn.

    Meta: preference ``{}`` (+ ``margin``); supervised ``{}`` (on ``chosen``); prompt-only
    ``{"reference": chosen reply}`` when non-empty.
    """

    def transcript(
        self, raw_sample: Mapping[str, Any], key: str, allow_empty_last: bool = False
    ) -> Conversation:
        text = self.field(raw_sample, key)
        parts = _HH_TURN.split(text)
        if parts[0].strip():
            raise DataFormatError(
                f"transcript must start with '\\n\\nHuman:', found text before it: {_snippet(parts[0])!r}",
                field=key,
            )
        if len(parts) < 3:
            raise DataFormatError(
                "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found in transcript", field=key
            )
        conversation: Conversation = []
        for speaker, turn_text in zip(parts[1::2], parts[2::2]):
            role = "user" if speaker == "Human" else "assistant"
            content = turn_text.strip()
            if conversation and conversation[-1]["role"] == role:
                conversation[-1]["content"] = "\n\n".join(
                    c for c in (conversation[-1]["content"], content) if c
                )
            else:
                conversation.append({"role": role, "content": content})
        if conversation[0]["role"] != "user":
            raise DataFormatError("transcript must start with a Human turn", field=key)
        for i, turn in enumerate(conversation):
            last = i == len(conversation) - 1
            if not turn["content"] and not (last and allow_empty_last):
                where = "final Assistant reply" if last and turn["role"] == "assistant" else f"turn {i}"
                raise DataFormatError(f"the {where} is empty (expected a non-empty string)", field=key)
        return conversation

    def format_preference_sample(
        self, raw_sample: Mapping[str, Any]
    ) -> tuple[Conversation, Conversation, Meta]:
        chosen = self.transcript(raw_sample, "chosen")
        rejected = self.transcript(raw_sample, "rejected")
        self.shared_prompt(chosen, rejected)
        return self.with_system(chosen), self.with_system(rejected), self.preference_meta(raw_sample)

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        chosen = self.transcript(raw_sample, "chosen")
        self.require_last_assistant(chosen, "chosen", "supervised training")
        return self.with_system(chosen), {}

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        chosen = self.transcript(raw_sample, "chosen", allow_empty_last=True)
        if raw_sample.get("rejected") is not None:
            prompt = self.shared_prompt(
                chosen, self.transcript(raw_sample, "rejected", allow_empty_last=True)
            )
            reference = chosen[-1]["content"]
        else:
            prompt, reference = self.split_reference(chosen)
        return self.with_system(prompt), ({"reference": reference} if reference else {})
