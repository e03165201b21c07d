"""Built-in formatters for text-only datasets (content is always a plain ``str``).

Each class documents the row layout it reads and the meta keys it emits. Errors name the offending
field (``messages[2].content``) so the dataset layer only has to add the file and row.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from aa_lightning.batch import CHOSEN_IS_SAFE, DESIRABLE, REJECTED_IS_SAFE
from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.base import BaseFormatter, Conversation, Meta, describe
from aa_lightning.data.formatters.registry import register_template

__all__ = [
    "Alpaca",
    "AlignAnythingText",
    "ChatFormatter",
    "GSM8K",
    "HHRLHF",
    "KTO",
    "Messages",
    "PKUSafeRLHF",
    "PKUSafeRLHFSafety",
    "ShareGPT",
    "UltraFeedback",
]

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


# ---------------------------------------------------------------------------------------------- Alpaca
@register_template("Alpaca")
class Alpaca(BaseFormatter):
    """``{instruction, input, output}`` rows (Stanford Alpaca / LLaMA-Factory ``alpaca_en_demo``).

    Prompt = ``instruction + "\\n\\n" + input`` when ``input`` is non-blank, else ``instruction``. A blank line
    (rather than align-anything's single space) keeps the instruction and its context, often a list or
    code, visually separate, matching how the Alpaca prompt template lays them out. ``input`` may be
    missing or null.

    Meta: supervised ``{}``; prompt-only ``{"reference": output}`` when ``output`` is present.
    """

    def prompt(self, raw_sample: Mapping[str, Any]) -> str:
        instruction = self.field(raw_sample, "instruction")
        extra = self.optional_field(raw_sample, "input", default="")
        return f"{instruction}\n\n{extra}" if extra.strip() else instruction

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        prompt = self.prompt(raw_sample)
        output = self.field(raw_sample, "output")
        return self.with_system(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        ), {}

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        prompt = self.prompt(raw_sample)
        output = self.optional_field(raw_sample, "output")
        meta: Meta = {"reference": output} if output else {}
        return self.with_system([{"role": "user", "content": prompt}]), meta


@register_template("AlignAnything-Text")
class AlignAnythingText(Alpaca):
    """align-anything's text SFT sample file: Alpaca columns plus ``text``, the prompt pre-rendered.

    ``text`` is ignored: it bakes in the Alpaca prompt template, while this project renders conversations
    with the model's own chat template. The file has no preference pairs, so only supervised and
    prompt-only are supported. Meta as :class:`Alpaca`.
    """


# ---------------------------------------------------------------------------------------------- chat
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


# ---------------------------------------------------------------------------------------------- HH-RLHF
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


# ---------------------------------------------------------------------------------------------- PKU
@register_template("PKU-SafeRLHF")
class PKUSafeRLHF(BaseFormatter):
    """PKU-SafeRLHF rows: ``prompt, response_0, response_1, better_response_id, safer_response_id,
    is_response_0_safe, is_response_1_safe``.

    Preference orders by helpfulness (``better_response_id``, 0 or 1). Meta: preference
    ``{"chosen_is_safe": bool, "rejected_is_safe": bool}`` (+ ``margin``), which Safe-RLHF's cost model
    needs; prompt-only ``{}``.
    """

    order_key = "better_response_id"

    def response_id(self, raw_sample: Mapping[str, Any], key: str) -> int:
        value = self.field(raw_sample, key, kind=int)
        if value not in (0, 1):
            raise DataFormatError(f"expected 0 or 1, got {describe(value)}", field=key)
        return value

    def format_preference_sample(
        self, raw_sample: Mapping[str, Any]
    ) -> tuple[Conversation, Conversation, Meta]:
        prompt = self.field(raw_sample, "prompt")
        better = self.response_id(raw_sample, self.order_key)
        worse = 1 - better
        chosen = self.field(raw_sample, f"response_{better}")
        rejected = self.field(raw_sample, f"response_{worse}")
        meta: Meta = {
            CHOSEN_IS_SAFE: self.field(raw_sample, f"is_response_{better}_safe", kind=bool),
            REJECTED_IS_SAFE: self.field(raw_sample, f"is_response_{worse}_safe", kind=bool),
            **self.preference_meta(raw_sample),
        }
        user = {"role": "user", "content": prompt}
        return (
            self.with_system([user, {"role": "assistant", "content": chosen}]),
            self.with_system([dict(user), {"role": "assistant", "content": rejected}]),
            meta,
        )

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        return self.with_system([{"role": "user", "content": self.field(raw_sample, "prompt")}]), {}


@register_template("PKU-SafeRLHF-Safety")
class PKUSafeRLHFSafety(PKUSafeRLHF):
    """As :class:`PKUSafeRLHF` but chosen = the safer response (``safer_response_id``), for cost models."""

    order_key = "safer_response_id"


# ---------------------------------------------------------------------------------------------- GSM8K
@register_template("GSM8K")
class GSM8K(BaseFormatter):
    """GSM8K rows ``{question, answer}`` whose answer ends with ``#### N``.

    Meta: prompt-only ``{"reference_answer": N, "solution": answer}`` where N is the text after the last
    ``####`` with thousands separators removed (``"1,080"`` -> ``"1080"``), as a string so rewards can
    compare exactly; supervised ``{}`` (trains on the full worked answer, calculator marks included).
    """

    def reference_answer(self, answer: str) -> str:
        if "####" not in answer:
            raise DataFormatError("expected the answer to end with '#### <final answer>'", field="answer")
        final = answer.rsplit("####", 1)[1].replace(",", "").strip()
        if not final:
            raise DataFormatError("the final answer after '####' is empty", field="answer")
        return final

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        question = self.field(raw_sample, "question")
        answer = self.field(raw_sample, "answer")
        return self.with_system(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        ), {}

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        question = self.field(raw_sample, "question")
        answer = self.field(raw_sample, "answer")
        meta: Meta = {"reference_answer": self.reference_answer(answer), "solution": answer}
        return self.with_system([{"role": "user", "content": question}]), meta
