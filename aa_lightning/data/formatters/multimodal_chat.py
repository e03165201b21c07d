"""The shared base of formatters for rows with images, audio or video (media markers, media columns).

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
from aa_lightning.data.formatters.base import Conversation, Meta
from aa_lightning.data.formatters.chat import ChatFormatter
from aa_lightning.data.media import MEDIA_KEYS, media_item

__all__ = ["KIND_KEYS", "MARKERS", "MultimodalChatFormatter", "media_parts_count"]


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
