"""Formatters for rows that hold a whole conversation: OpenAI ``messages``, KTO's labelled messages, ShareGPT."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aa_lightning.batch import DESIRABLE
from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.base import Conversation, Meta
from aa_lightning.data.formatters.chat import ChatFormatter
from aa_lightning.data.formatters.registry import register_template

__all__ = ["KTO", "Messages", "ShareGPT"]


@register_template("Messages")
class Messages(ChatFormatter):
    """``{messages: [{role, content}, ...]}`` rows (OpenAI layout; LLaMA-Factory ``v1_sft_demo``).

    Roles are system/user/assistant (human/gpt and ``{from, value}`` are tolerated); content may be a
    string or a list of text parts. Supervised needs a final assistant turn; prompt-only drops it.

    Meta: supervised ``{}``; prompt-only ``{"reference": final assistant content}`` when there was one.
    """

    messages_key = "messages"

    def conversation(self, raw_sample: Mapping[str, Any], allow_empty_last: bool = False) -> Conversation:
        messages = self.field(raw_sample, self.messages_key, kind=list)
        return self.parse_messages(messages, self.messages_key, allow_empty_last=allow_empty_last)

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        conversation = self.conversation(raw_sample)
        self.require_last_assistant(conversation, self.messages_key, "supervised training")
        return self.with_system(conversation), {}

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        prompt, reference = self.split_reference(self.conversation(raw_sample, allow_empty_last=True))
        return self.with_system(prompt), ({"reference": reference} if reference else {})


@register_template("KTO")
class KTO(Messages):
    """Unpaired KTO rows ``{messages, label}``; ``label`` must be a JSON boolean (desirable or not).

    Strings such as ``"true"`` are rejected: silently treating ``"false"`` as truthy would flip the
    training signal. Meta: supervised ``{"desirable": bool}``; prompt-only as :class:`Messages`.
    """

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        desirable = self.field(raw_sample, "label", kind=bool)
        conversation, meta = super().format_supervised_sample(raw_sample)
        return conversation, {**meta, DESIRABLE: desirable}


@register_template("ShareGPT")
class ShareGPT(ChatFormatter):
    """ShareGPT rows: ``{conversations: [{from, value}], chosen?: {from, value}, rejected?: ..., system?}``.

    ``from`` is human/gpt/system (user/assistant tolerated). An optional top-level ``system`` string is
    used as the system turn when the conversation has none. For preference rows (LLaMA-Factory
    ``dpo_en_demo``) ``conversations`` ends with the human turn and ``chosen``/``rejected`` hold one gpt
    message each (a bare string is also accepted). Supervised uses the conversation as is, or, when it
    ends with a human turn and the row has ``chosen``, the conversation plus ``chosen`` (SFT on the
    preferred reply).

    Meta: supervised ``{}``; preference ``{}`` (+ ``margin``); prompt-only ``{"reference": ...}`` from the
    final gpt turn or ``chosen`` when available.
    """

    def conversation(self, raw_sample: Mapping[str, Any], allow_empty_last: bool = False) -> Conversation:
        conversation = self.parse_messages(
            self.field(raw_sample, "conversations", kind=list), "conversations", allow_empty_last
        )
        system = self.optional_field(raw_sample, "system", default="")
        if system.strip() and conversation[0]["role"] != "system":
            conversation = [{"role": "system", "content": system}, *conversation]
        return conversation

    def reply(self, raw_sample: Mapping[str, Any], key: str) -> dict[str, Any]:
        value = self.field(raw_sample, key, kind=(dict, str))
        if isinstance(value, str):
            return {"role": "assistant", "content": value}
        message = self.parse_message(value, key)
        if message["role"] != "assistant":
            raise DataFormatError(
                f"expected a gpt/assistant message, got role {message['role']!r}", field=key
            )
        return message

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        conversation = self.conversation(raw_sample)
        if conversation[-1]["role"] == "user" and "chosen" in raw_sample:
            conversation = [*conversation, self.reply(raw_sample, "chosen")]
        self.require_last_assistant(conversation, "conversations", "supervised training")
        return self.with_system(conversation), {}

    def format_preference_sample(
        self, raw_sample: Mapping[str, Any]
    ) -> tuple[Conversation, Conversation, Meta]:
        prompt = self.conversation(raw_sample)
        if prompt[-1]["role"] != "user":
            raise DataFormatError(
                "for preference rows the conversation must end with the human turn that chosen/rejected "
                f"answer, got role {prompt[-1]['role']!r}",
                field="conversations",
            )
        chosen, rejected = self.reply(raw_sample, "chosen"), self.reply(raw_sample, "rejected")
        return (
            self.with_system([*prompt, chosen]),
            self.with_system([*prompt, rejected]),
            self.preference_meta(raw_sample),
        )

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        prompt, reference = self.split_reference(self.conversation(raw_sample, allow_empty_last=True))
        if reference is None and raw_sample.get("chosen") is not None:
            reference = self.reply(raw_sample, "chosen")["content"]
        return self.with_system(prompt), ({"reference": reference} if reference else {})
