"""Formatters for rows with images, audio or video.

A multimodal conversation is the text one with parts lists as contents, e.g. ``[{"type": "image"},
{"type": "text", "text": "Who is he?"}]``; the processor's chat template renders each media part as its
placeholder. The media themselves go in the meta under ``images`` / ``audios`` / ``videos``: one entry per
media part, in the order the parts appear, each wrapped with :func:`media_item` so an error can name the
column (``images[1]``). An entry is whatever the row holds (a path relative to the data file, bytes, a
``{bytes, path}`` dict, a PIL image, an audio ``{array, sampling_rate}`` dict); the encoder resolves and
checks it, the collator decodes it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.base import BaseFormatter, Conversation, Meta, describe
from aa_lightning.data.formatters.chat import ChatFormatter
from aa_lightning.data.formatters.registry import register_template
from aa_lightning.data.media import MEDIA_KEYS, media_item

__all__ = [
    "AA_TA2T",
    "AA_TI2T",
    "AA_TV2T",
    "LLaVAInstruct",
    "MLLMAudio",
    "MLLMMessages",
    "MLLMVideo",
    "MultimodalChatFormatter",
    "RLAIFV",
    "SpeechASR",
]

KIND_KEYS = {kind: key for key, kind in MEDIA_KEYS.items()}  # "image" -> "images"
MARKERS = {"<image>": "image", "<audio>": "audio", "<video>": "video"}
_MARKER_RE = re.compile("(" + "|".join(re.escape(m) for m in MARKERS) + ")")


def media_parts_count(conversation: Conversation) -> dict[str, int]:
    """How many parts of each media kind a conversation holds."""
    counts = dict.fromkeys(KIND_KEYS, 0)
    for message in conversation:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part.get("type") in counts:
                    counts[part["type"]] += 1
    return counts


class MultimodalChatFormatter(ChatFormatter):
    """Unregistered base for chat rows whose messages mark media with ``<image>``/``<audio>``/``<video>``.

    Contents may also be parts lists already (``{"type": "image"}``; a part's own ``image``/``path``/``url``
    value is used when the row has no media column). Rows whose messages carry no marker get one part per
    media item at the start of the first user turn (what LLaVA-style loaders do).
    """

    #: media kinds this layout accepts
    kinds: tuple[str, ...] = ("image", "audio", "video")

    def text_content(self, value: Any, field: str, allow_empty: bool = False) -> Any:
        """A string with markers -> parts list; a string without -> the string; parts lists are checked."""
        if isinstance(value, str):
            if not _MARKER_RE.search(value):
                return self.check(value, field, kind=str, allow_empty=allow_empty)
            parts: list[dict[str, Any]] = []
            for piece in _MARKER_RE.split(value):
                if piece in MARKERS:
                    parts.append(self._media_part(MARKERS[piece], field))
                elif piece:
                    parts.append({"type": "text", "text": piece})
            return parts
        self.check(value, field, kind=list, allow_empty=allow_empty)
        parts = []
        for j, part in enumerate(value):
            part_field = f"{field}[{j}]"
            self.check(part, part_field, kind=dict)
            kind = part.get("type", "text")
            if kind == "text":
                key = "text" if "text" in part else "value"
                parts.append(
                    {
                        "type": "text",
                        "text": self.check(part.get(key), f"{part_field}.{key}", allow_empty=True),
                    }
                )
            elif kind in KIND_KEYS:
                media_part = self._media_part(kind, part_field)
                inline = next(
                    (part[k] for k in (kind, "path", "url", f"{kind}_url") if part.get(k) is not None), None
                )
                if inline is not None:
                    media_part["_inline"] = media_item(inline, part_field)
                parts.append(media_part)
            else:
                raise DataFormatError(f"unsupported part type {kind!r}", field=f"{part_field}.type")
        return parts

    def _media_part(self, kind: str, field: str) -> dict[str, Any]:
        if kind not in self.kinds:
            raise DataFormatError(
                f"{self.name!r} takes {', '.join(self.kinds)} input, but the row has a {kind} part",
                field=field,
            )
        return {"type": kind}

    def media_column(self, raw_sample: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
        """The row's list (or single value) of media of ``kind`` as :func:`media_item` entries."""
        for key in (KIND_KEYS[kind], kind):
            value = raw_sample.get(key)
            if value is None:
                continue
            if isinstance(value, (list, tuple)):
                return [media_item(v, f"{key}[{i}]") for i, v in enumerate(value)]
            return [media_item(value, key)]
        return []

    def attach_media(self, raw_sample: Mapping[str, Any], *conversations: Conversation) -> Meta:
        """Meta with the row's media; checks part counts and inserts parts for marker-less rows.

        All conversations share the prompt (where the media are), so the first one is counted.
        """
        first = conversations[0]
        inline = {kind: [] for kind in KIND_KEYS}
        for message in first:
            if isinstance(message["content"], list):
                for part in message["content"]:
                    if "_inline" in part:
                        inline[part["type"]].append(part["_inline"])
        for conversation in conversations:
            for message in conversation:
                if isinstance(message["content"], list):
                    for part in message["content"]:
                        part.pop("_inline", None)
        counts = media_parts_count(first)
        for kind in KIND_KEYS:
            if kind not in self.kinds and self.media_column(raw_sample, kind):
                raise DataFormatError(
                    f"{self.name!r} takes {', '.join(self.kinds)} input, but the row has {kind}s",
                    field=KIND_KEYS[kind],
                )
        meta: Meta = {}
        for kind in self.kinds:
            key = KIND_KEYS[kind]
            items = self.media_column(raw_sample, kind)
            if items and inline[kind]:
                raise DataFormatError(f"{kind}s are given both in the messages and in the column", field=key)
            items = items or inline[kind]
            if counts[kind] == 0 and items:
                for conversation in conversations:
                    self._prepend_parts(conversation, kind, len(items))
            elif counts[kind] != len(items):
                raise DataFormatError(
                    f"the messages have {counts[kind]} <{kind}> marker(s) but the row has {len(items)} {kind}(s)",
                    field=key,
                )
            if items:
                meta[key] = items
        return meta

    @staticmethod
    def _prepend_parts(conversation: Conversation, kind: str, count: int) -> None:
        for message in conversation:
            if message["role"] == "user":
                content = message["content"]
                parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
                message["content"] = [{"type": kind} for _ in range(count)] + parts
                return


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


# ---------------------------------------------------------------------------------------------- RLAIF-V
@register_template("RLAIF-V")
class RLAIFV(BaseFormatter):
    """RLAIF-V rows: ``{question, image_path | image, metainfos?: {reference}, chosen?, rejected?}``.

    The ``detail_test`` prompt files are prompt-only (VLM RL): meta ``reference`` from
    ``metainfos.reference`` when non-empty. Rows of the RLAIF-V preference set (``chosen``/``rejected``)
    also give preference samples, and supervised samples on ``chosen``.
    """

    def image(self, raw_sample: Mapping[str, Any]) -> Meta:
        for key in ("image_path", "image"):
            if raw_sample.get(key) is not None:
                return {"images": [media_item(raw_sample[key], key)]}
        raise DataFormatError(
            "missing required key (the row needs 'image_path' or 'image')", field="image_path"
        )

    def prompt(self, raw_sample: Mapping[str, Any]) -> Conversation:
        question = self.field(raw_sample, "question")
        return self.with_system(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        )

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        meta = self.image(raw_sample)
        info = self.optional_field(raw_sample, "metainfos", kind=dict, default={})
        reference = info.get("reference")
        if isinstance(reference, str) and reference.strip():
            meta["reference"] = reference
        return self.prompt(raw_sample), meta

    def format_preference_sample(
        self, raw_sample: Mapping[str, Any]
    ) -> tuple[Conversation, Conversation, Meta]:
        prompt = self.prompt(raw_sample)
        chosen, rejected = self.field(raw_sample, "chosen"), self.field(raw_sample, "rejected")
        return (
            [*prompt, {"role": "assistant", "content": chosen}],
            [*prompt, {"role": "assistant", "content": rejected}],
            {**self.image(raw_sample), **self.preference_meta(raw_sample)},
        )

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        chosen = self.field(raw_sample, "chosen")
        return [*self.prompt(raw_sample), {"role": "assistant", "content": chosen}], self.image(raw_sample)


# ---------------------------------------------------------------------------------------------- ASR
@register_template("Speech-ASR")
class SpeechASR(BaseFormatter):
    """Speech recognition rows: an audio column (``audio``/``wav``/``path``) and its transcript
    (``text``/``wrd``/``transcript``/``sentence``), e.g. speechbrain's ASR manifests.

    The user turn is the clip plus :attr:`instruction`; the assistant turn is the transcript. A
    ``{data_root}/`` prefix (speechbrain manifests) means "next to the data file". Meta: ``audios``;
    prompt-only adds ``reference`` (the transcript).
    """

    instruction: str = "Transcribe the speech."
    audio_keys = ("audio", "wav", "path", "audio_path")
    text_keys = ("text", "wrd", "transcript", "sentence")

    def audio(self, raw_sample: Mapping[str, Any]) -> Meta:
        for key in self.audio_keys:
            value = raw_sample.get(key)
            if value is not None:
                if isinstance(value, str):
                    value = value.replace("{data_root}/", "")
                return {"audios": [media_item(value, key)]}
        raise DataFormatError(
            f"missing audio (the row needs one of {', '.join(self.audio_keys)})", field=self.audio_keys[0]
        )

    def transcript(self, raw_sample: Mapping[str, Any]) -> str:
        for key in self.text_keys:
            if key in raw_sample:
                return self.field(raw_sample, key).strip()
        raise DataFormatError(
            f"missing transcript (the row needs one of {', '.join(self.text_keys)})", field=self.text_keys[0]
        )

    def prompt(self) -> Conversation:
        return self.with_system(
            [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": self.instruction}]}]
        )

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        text = self.transcript(raw_sample)
        return [*self.prompt(), {"role": "assistant", "content": text}], self.audio(raw_sample)

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        return self.prompt(), {**self.audio(raw_sample), "reference": self.transcript(raw_sample)}


# ---------------------------------------------------------------------------------------------- align-anything
class AlignAnythingMedia(BaseFormatter):
    """Unregistered base of align-anything's any-to-text layouts: a prompt, ``response_1``/``response_2``,
    ``overall_response`` (1 or 2: the better one) and one media column.

    Supervised rows use ``response`` when present (align-anything's SFT files), else the better response.
    Meta: the media list; preference adds ``margin`` when present; prompt-only ``{}`` + media.
    """

    kind: str = "image"
    media_columns: tuple[str, ...] = ("image",)
    prompt_keys: tuple[str, ...] = ("question", "prompt")
    strip_marker: str = ""

    def prompt_text(self, raw_sample: Mapping[str, Any]) -> str:
        self._check_row(raw_sample)
        key = next((k for k in self.prompt_keys if k in raw_sample), self.prompt_keys[0])
        text = self.field(raw_sample, key)
        if self.strip_marker:
            text = text.replace(self.strip_marker, "").strip()
            self.check(text, key)
        return text

    def media(self, raw_sample: Mapping[str, Any]) -> Meta:
        for key in self.media_columns:
            if raw_sample.get(key) is not None:
                return {KIND_KEYS[self.kind]: [media_item(raw_sample[key], key)]}
        raise DataFormatError(
            f"missing {self.kind} (the row needs {' or '.join(map(repr, self.media_columns))})",
            field=self.media_columns[0],
        )

    def prompt(self, raw_sample: Mapping[str, Any]) -> Conversation:
        parts = [{"type": self.kind}, {"type": "text", "text": self.prompt_text(raw_sample)}]
        return self.with_system([{"role": "user", "content": parts}])

    def better_id(self, raw_sample: Mapping[str, Any]) -> int:
        value = self.field(raw_sample, "overall_response", kind=(int, str))
        try:
            better = int(value)
        except ValueError:
            better = 0
        if better not in (1, 2):
            raise DataFormatError(f"expected 1 or 2, got {describe(value)}", field="overall_response")
        return better

    def format_preference_sample(
        self, raw_sample: Mapping[str, Any]
    ) -> tuple[Conversation, Conversation, Meta]:
        better = self.better_id(raw_sample)
        chosen = self.field(raw_sample, f"response_{better}")
        rejected = self.field(raw_sample, f"response_{3 - better}")
        prompt = self.prompt(raw_sample)
        return (
            [*prompt, {"role": "assistant", "content": chosen}],
            [*prompt, {"role": "assistant", "content": rejected}],
            {**self.media(raw_sample), **self.preference_meta(raw_sample)},
        )

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        self._check_row(raw_sample)
        if "response" in raw_sample:
            answer = self.field(raw_sample, "response")
        else:
            answer = self.field(raw_sample, f"response_{self.better_id(raw_sample)}")
        return [*self.prompt(raw_sample), {"role": "assistant", "content": answer}], self.media(raw_sample)

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        return self.prompt(raw_sample), self.media(raw_sample)


@register_template("AA_TI2T")
class AA_TI2T(AlignAnythingMedia):  # noqa: N801 - the name align-anything users know
    """Align-Anything text+image -> text: ``{question | prompt, image, response_1, response_2,
    overall_response}`` (SFT files: ``{prompt, image, response}``). ``image`` is a path, bytes or PIL."""

    kind = "image"
    media_columns = ("image", "image_path")


@register_template("AA_TA2T")
class AA_TA2T(AlignAnythingMedia):  # noqa: N801
    """Align-Anything text+audio -> text: ``{prompt, audio_path | audio, response_1, response_2,
    overall_response}``; the audio is a path, bytes or a decoded ``{array, sampling_rate}`` dict."""

    kind = "audio"
    media_columns = ("audio_path", "audio")
    prompt_keys = ("prompt", "question")


@register_template("AA_TV2T")
class AA_TV2T(AlignAnythingMedia):  # noqa: N801
    """Align-Anything text+video -> text: ``{prompt, video_path | video, response_1, response_2,
    overall_response}``; a ``<video>`` marker in the prompt is removed (the part is added)."""

    kind = "video"
    media_columns = ("video_path", "video")
    prompt_keys = ("prompt", "question")
    strip_marker = "<video>"
