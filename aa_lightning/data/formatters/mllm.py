"""Formatters for LLaMA-Factory's multimodal chat rows (``<image>``/``<audio>``/``<video>`` markers in the turns).

One class per accepted media kind so a config's template name says what its data holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.base import Conversation, Meta
from aa_lightning.data.formatters.multimodal_chat import MultimodalChatFormatter
from aa_lightning.data.formatters.registry import register_template

__all__ = ["LLaVAInstruct", "MLLMAudio", "MLLMMessages", "MLLMVideo"]


@register_template("MLLM-Messages")
class MLLMMessages(MultimodalChatFormatter):
    """LLaMA-Factory's multimodal layout: ``{messages, images?, audios?, videos?}`` (also ShareGPT's
    ``{conversations: [{from, value}]}``), markers ``<image>``/``<audio>``/``<video>`` in the turns.

    Preference rows (LLaMA-Factory ``mllm_dpo``) end the conversation with the user turn and carry
    ``chosen``/``rejected`` (a message or a string). Meta: the media lists; prompt-only adds
    ``reference`` (the final assistant turn or ``chosen``) when there is one.
    """

    def conversation(self, raw_sample: Mapping[str, Any], allow_empty_last: bool = False) -> Conversation:
        key = "messages" if "messages" in raw_sample or "conversations" not in raw_sample else "conversations"
        return self.parse_messages(self.field(raw_sample, key, kind=list), key, allow_empty_last)

    def reply(self, raw_sample: Mapping[str, Any], key: str) -> dict[str, Any]:
        value = self.field(raw_sample, key, kind=(dict, str))
        if isinstance(value, str):
            return {"role": "assistant", "content": value}
        message = self.parse_message(value, key)
        if message["role"] != "assistant":
            raise DataFormatError(f"expected an assistant message, got role {message['role']!r}", field=key)
        return message

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        conversation = self.conversation(raw_sample)
        if conversation[-1]["role"] == "user" and "chosen" in raw_sample:
            conversation = [*conversation, self.reply(raw_sample, "chosen")]
        self.require_last_assistant(conversation, "messages", "supervised training")
        meta = self.attach_media(raw_sample, conversation)
        return self.with_system(conversation), meta

    def format_preference_sample(
        self, raw_sample: Mapping[str, Any]
    ) -> tuple[Conversation, Conversation, Meta]:
        prompt = self.conversation(raw_sample)
        if prompt[-1]["role"] != "user":
            raise DataFormatError(
                "for preference rows the conversation must end with the user turn that chosen/rejected answer",
                field="messages",
            )
        chosen = [*prompt, self.reply(raw_sample, "chosen")]
        rejected = [*[dict(m) for m in prompt], self.reply(raw_sample, "rejected")]
        meta = {**self.attach_media(raw_sample, chosen, rejected), **self.preference_meta(raw_sample)}
        return self.with_system(chosen), self.with_system(rejected), meta

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        prompt, reference = self.split_reference(self.conversation(raw_sample, allow_empty_last=True))
        if reference is None and raw_sample.get("chosen") is not None:
            reference = self.reply(raw_sample, "chosen")["content"]
        meta = self.attach_media(raw_sample, prompt)
        if reference:
            meta["reference"] = reference
        return self.with_system(prompt), meta


@register_template("LLaVA-Instruct")
class LLaVAInstruct(MLLMMessages):
    """LLaVA-Instruct rows ``{image, conversations: [{from: human|gpt, value}]}`` with ``<image>`` markers;
    ``{messages, images}`` (LLaMA-Factory ``mllm_demo``) works too. Images only. Meta as MLLM-Messages."""

    kinds = ("image",)


@register_template("MLLM-Audio")
class MLLMAudio(MLLMMessages):
    """LLaMA-Factory ``mllm_audio_demo`` rows ``{messages, audios}`` with ``<audio>`` markers. Audio only."""

    kinds = ("audio",)


@register_template("MLLM-Video")
class MLLMVideo(MLLMMessages):
    """LLaMA-Factory ``mllm_video_demo`` rows ``{messages, videos}`` with ``<video>`` markers. Video only."""

    kinds = ("video",)
