"""Shared parsing for chat-style rows: message lists with roles, checked to alternate user/assistant.

Text and multimodal chat formatters subclass :class:`ChatFormatter`, so every layout accepts the same role
names and content shapes and names the offending field (``messages[2].content``) in its errors.
"""

from __future__ import annotations

from typing import Any

from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.base import BaseFormatter, Conversation

__all__ = ["ChatFormatter"]


# OpenAI-style and ShareGPT-style role names, both accepted so one parser serves every chat layout.
_ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}


def _snippet(text: str, limit: int = 60) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ChatFormatter(BaseFormatter):
    """Unregistered base for chat-style rows: message parsing and validation shared by subclasses."""

    def text_content(self, value: Any, field: str, allow_empty: bool = False) -> str:
        """Message content as ``str``; a list of text parts (``{type: text, text|value}``) is joined.

        LLaMA-Factory's v1 files store content as text parts; normalising here keeps every text
        formatter's output a plain string that any chat template accepts.
        """
        if isinstance(value, list):
            pieces: list[str] = []
            for j, part in enumerate(value):
                part_field = f"{field}[{j}]"
                self.check(part, part_field, kind=dict)
                part_type = part.get("type", "text")
                if part_type != "text":
                    raise DataFormatError(
                        f"text formatter {self.name!r} cannot take a {part_type!r} part; "
                        "use a multimodal formatter",
                        field=part_field,
                    )
                key = "text" if "text" in part else "value"
                pieces.append(self.check(part.get(key), f"{part_field}.{key}", allow_empty=True))
            value = "".join(pieces)
        return self.check(value, field, kind=str, allow_empty=allow_empty)

    def parse_message(self, message: Any, field: str, allow_empty: bool = False) -> dict[str, Any]:
        """One ``{role, content}`` or ShareGPT ``{from, value}`` message -> ``{role, content}``."""
        self.check(message, field, kind=dict)
        role_key, content_key = ("from", "value") if "from" in message else ("role", "content")
        if role_key not in message:
            raise DataFormatError("message has neither a 'role' nor a 'from' key", field=field)
        raw_role = self.check(message[role_key], f"{field}.{role_key}")
        role = _ROLE_ALIASES.get(raw_role.strip().lower())
        if role is None:
            raise DataFormatError(
                f"unsupported role {raw_role!r}; expected one of {', '.join(map(repr, _ROLE_ALIASES))}",
                field=f"{field}.{role_key}",
            )
        if content_key not in message:
            raise DataFormatError(f"message has no {content_key!r} key", field=field)
        content = self.text_content(message[content_key], f"{field}.{content_key}", allow_empty=allow_empty)
        return {"role": role, "content": content}

    def parse_messages(self, messages: Any, field: str, allow_empty_last: bool = False) -> Conversation:
        """A validated conversation: optional leading system turn, then strictly alternating user/assistant.

        Alternation is enforced because most chat templates reject (or silently mangle) two turns of
        the same role; catching it here names the exact turn.
        """
        self.check(messages, field, kind=list)
        conversation: Conversation = []
        for i, message in enumerate(messages):
            last = i == len(messages) - 1
            conversation.append(
                self.parse_message(message, f"{field}[{i}]", allow_empty=allow_empty_last and last)
            )
        offset = 1 if conversation[0]["role"] == "system" else 0
        for i, turn in enumerate(conversation[offset:], start=offset):
            expected = "user" if (i - offset) % 2 == 0 else "assistant"
            if turn["role"] != expected:
                raise DataFormatError(
                    f"turn {i} has role {turn['role']!r} but {expected!r} was expected (turns must alternate "
                    "user/assistant, starting with user, after an optional leading system turn)",
                    field=f"{field}[{i}]",
                )
        if offset == len(conversation):
            raise DataFormatError("conversation has a system turn but no user turn", field=field)
        return conversation

    @staticmethod
    def require_last_assistant(conversation: Conversation, field: str, purpose: str) -> None:
        if conversation[-1]["role"] != "assistant":
            raise DataFormatError(
                f"the last turn must be an assistant reply for {purpose}, got role {conversation[-1]['role']!r}",
                field=field,
            )

    @staticmethod
    def split_reference(conversation: Conversation) -> tuple[Conversation, Any]:
        """(prompt ending with a user turn, final assistant content or None)."""
        if conversation[-1]["role"] == "assistant":
            return conversation[:-1], conversation[-1]["content"]
        return conversation, None

    @staticmethod
    def shared_prompt(chosen: Conversation, rejected: Conversation, field: str = "rejected") -> Conversation:
        """The common prefix of a preference pair; they must differ only in the final assistant turn."""
        for side, conv in (("chosen", chosen), ("rejected", rejected)):
            if conv[-1]["role"] != "assistant":
                raise DataFormatError(
                    f"must end with an assistant reply, got role {conv[-1]['role']!r}", field=side
                )
        prompt_c, prompt_r = chosen[:-1], rejected[:-1]
        if prompt_c != prompt_r:
            i = next(
                (k for k, (a, b) in enumerate(zip(prompt_c, prompt_r)) if a != b),
                min(len(prompt_c), len(prompt_r)),
            )
            c = _snippet(prompt_c[i]["content"]) if i < len(prompt_c) else "<end of conversation>"
            r = _snippet(prompt_r[i]["content"]) if i < len(prompt_r) else "<end of conversation>"
            raise DataFormatError(
                "chosen and rejected must share every turn except the final assistant reply, but they "
                f"differ at turn {i} (chosen: {c!r}; rejected: {r!r})",
                field=field,
            )
        return prompt_c
