"""The formatter contract: turn one raw dataset row into chat-style conversations.

Datasets differ only in which keys hold the prompt and the responses ("key-value parsing" in
align-anything). A formatter isolates that so every algorithm sees the same shape:

* supervised (SFT):   ``(conversation, meta)``
* preference (RM/DPO): ``(chosen_conversation, rejected_conversation, meta)``
* prompt-only (PPO/GRPO): ``(conversation ending with a user turn, meta)``

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": ...}``. The base class
does not look inside ``content``: text formatters use a ``str``, multimodal ones a list of parts such as
``[{"type": "image"}, {"type": "text", "text": ...}]``. Chat templates are applied later by the tokenizer /
processor, never here.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping
from typing import Any, ClassVar

from aa_lightning.batch import MARGIN, SAMPLE_KINDS
from aa_lightning.data.errors import DataFormatError

__all__ = ["SAMPLE_KINDS", "BaseFormatter", "Conversation", "Meta", "TypeSpec"]

Conversation = list[dict[str, Any]]
Meta = dict[str, Any]
TypeSpec = type | tuple[type, ...]


_KIND_NAMES: dict[type, str] = {
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    list: "list",
    tuple: "list",
    dict: "mapping",
}
_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60


def _as_tuple(kind: TypeSpec) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: TypeSpec) -> str:
    kinds = _as_tuple(kind)
    names: list[str] = []
    for k in kinds:
        if k is int and float in kinds:  # "an integer or number" reads oddly; a number covers both
            continue
        name = _KIND_NAMES.get(k, k.__name__)
        if name not in names:
            names.append(name)
    return " or ".join(names)


def _matches(value: Any, kind: TypeSpec) -> bool:
    kinds = _as_tuple(kind)
    # bool is an int subclass; a JSON `true` where a number is expected is a data bug, not a 1.
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds)


def _is_empty(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple, dict)):
        return len(value) == 0
    return False


def describe(value: Any) -> str:
    """Short, type-revealing rendering of a bad value for error messages (``None``, ``str 'true'``...)."""
    if value is None:
        return "None"
    if isinstance(value, str) and _is_empty(value):
        return repr(value)
    return f"{type(value).__name__} {_repr.repr(value)}"


class BaseFormatter:
    """Base class of all dataset formatters; subclasses override the sample kinds they support.

    ``system_prompt`` is prepended as a system turn (when non-empty) by :meth:`with_system`, so a
    training config can set it per run via ``get_formatter(name, system_prompt=...)``.
    """

    system_prompt: str = ""
    #: Set by ``register_template``; used in messages so users see the name they configured.
    template_name: ClassVar[str | None] = None

    def __init__(self, system_prompt: str | None = None) -> None:
        if system_prompt is not None:
            if not isinstance(system_prompt, str):
                raise TypeError(f"system_prompt must be a str, got {type(system_prompt).__name__}")
            self.system_prompt = system_prompt

    @property
    def name(self) -> str:
        """Registered template name, falling back to the class name for unregistered formatters."""
        return self.template_name or type(self).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, system_prompt={self.system_prompt!r})"

    # ------------------------------------------------------------------ the three sample kinds
    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        """Return the full conversation (ending with the assistant turn to learn) and meta data."""
        raise self._unsupported("supervised")

    def format_preference_sample(
        self, raw_sample: Mapping[str, Any]
    ) -> tuple[Conversation, Conversation, Meta]:
        """Return (better/chosen conversation, worse/rejected conversation, meta); they share the prompt."""
        raise self._unsupported("preference")

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        """Return the prompt conversation (ending with a user turn) and meta (e.g. a reference answer)."""
        raise self._unsupported("prompt_only")

    @classmethod
    def supported_kinds(cls) -> tuple[str, ...]:
        """Sample kinds this formatter overrides, so a dataset can fail early on a wrong pairing."""
        return tuple(
            kind
            for kind in SAMPLE_KINDS
            if getattr(cls, f"format_{kind}_sample") is not getattr(BaseFormatter, f"format_{kind}_sample")
        )

    def _unsupported(self, kind: str) -> NotImplementedError:
        supported = ", ".join(self.supported_kinds()) or "none"
        return NotImplementedError(
            f"formatter {self.name!r} ({type(self).__name__}) does not support {kind.replace('_', '-')} "
            f"samples (format_{kind}_sample); it supports: {supported}"
        )

    # ------------------------------------------------------------------ validated access
    def check(self, value: Any, field: str, kind: TypeSpec = str, allow_empty: bool = False) -> Any:
        """Validate an already-extracted value (e.g. ``messages[2].content``) and return it unchanged."""
        if value is None or not _matches(value, kind):
            raise DataFormatError(
                f"expected {self._expected(kind, allow_empty)}, got {describe(value)}", field=field
            )
        if not allow_empty and _is_empty(value):
            raise DataFormatError(
                f"expected {self._expected(kind, allow_empty)}, got {describe(value)}", field=field
            )
        return value

    def field(
        self, raw_sample: Mapping[str, Any], key: str, kind: TypeSpec = str, allow_empty: bool = False
    ) -> Any:
        """``raw_sample[key]`` checked for presence, type and (for strings/containers) emptiness."""
        self._check_row(raw_sample)
        if key not in raw_sample:
            keys = ", ".join(repr(k) for k in raw_sample) or "none"
            raise DataFormatError(f"missing required key (row has keys: {keys})", field=key)
        return self.check(raw_sample[key], key, kind=kind, allow_empty=allow_empty)

    def optional_field(
        self, raw_sample: Mapping[str, Any], key: str, kind: TypeSpec = str, default: Any = None
    ) -> Any:
        """Like :meth:`field` but a missing key or ``None`` gives ``default``; empty values are allowed."""
        self._check_row(raw_sample)
        value = raw_sample.get(key)
        if value is None:
            return default
        return self.check(value, key, kind=kind, allow_empty=True)

    @staticmethod
    def _check_row(raw_sample: Any) -> None:
        if not isinstance(raw_sample, Mapping):
            raise DataFormatError(
                f"expected the row to be a mapping of column -> value, got {describe(raw_sample)}"
            )

    @staticmethod
    def _expected(kind: TypeSpec, allow_empty: bool) -> str:
        name = _kind_name(kind)
        empty_able = any(k in (str, list, tuple, dict) for k in _as_tuple(kind))
        prefix = "a non-empty " if (empty_able and not allow_empty) else "a "
        if name[0] in "aeiou" and prefix == "a ":
            prefix = "an "
        return prefix + name

    # ------------------------------------------------------------------ conversation helpers
    def system_message(self) -> dict[str, Any]:
        """The system turn for ``system_prompt``; multimodal formatters may override to use parts."""
        return {"role": "system", "content": self.system_prompt}

    def with_system(self, conversation: Conversation) -> Conversation:
        """Prepend ``system_prompt`` when non-empty, unless the row already starts with its own system turn.

        The row's own system prompt wins because it is part of the data (e.g. ShareGPT rows carry
        task-specific system prompts); returns a new list and never mutates the input.
        """
        if not self.system_prompt or (conversation and conversation[0].get("role") == "system"):
            return list(conversation)
        return [self.system_message(), *conversation]

    def preference_meta(self, raw_sample: Mapping[str, Any]) -> Meta:
        """Meta shared by all preference formatters: ``margin`` (float) when the row has a numeric one."""
        margin = self.optional_field(raw_sample, "margin", kind=(int, float))
        if margin is None:
            return {}
        if not math.isfinite(margin):
            raise DataFormatError(f"expected a finite number, got {margin!r}", field="margin")
        return {MARGIN: float(margin)}
