"""Config sections as typed dataclasses whatever the entry point (Python, YAML, the command line).

From Python a section arrives as its dataclass; through LightningCLI the saved hyper-parameters hold plain dicts.
Modules and datamodules coerce each section once, in ``__init__``, so every reader sees one typed object and a
misspelt key fails at start-up instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

__all__ = ["as_config", "as_config_list"]

ConfigT = TypeVar("ConfigT")


def as_config(config_class: type[ConfigT], value: Any, name: str | None = None) -> ConfigT:
    """``value`` as a ``config_class`` instance: the instance itself, a mapping of its fields, or None (defaults).

    Unknown or missing fields raise a ``ValueError`` naming the section and listing the accepted fields, so a
    typo in a YAML file fails at start-up instead of being ignored. ``name`` is the config section (``lora``).
    """
    section = name or config_class.__name__
    if value is None:
        return config_class()
    if isinstance(value, config_class):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{section}: expected a {config_class.__name__} or a mapping of its fields, got {type(value).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ValueError(
            f"{section}: unknown field(s) {', '.join(map(repr, unknown))}; "
            f"{config_class.__name__} accepts {', '.join(fields)}"
        )
    required = [
        n
        for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if n not in value]
    if missing:
        raise ValueError(f"{section}: missing required field(s) {', '.join(map(repr, missing))}")
    return config_class(**value)


def as_config_list(config_class: type[ConfigT], value: Any, name: str) -> list[ConfigT]:
    """A list section (``reward_functions``, a data split's specs) as ``config_class`` instances.

    Accepts None (empty), one instance or mapping (a list of one), or a sequence of them; each item is
    coerced by :func:`as_config` under the name ``name[i]`` so an error points at the offending entry.
    """
    if value is None:
        return []
    if isinstance(value, (config_class, Mapping)):
        return [as_config(config_class, value, name)]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(
            f"{name}: expected a list of {config_class.__name__} (or mappings of its fields), "
            f"got {type(value).__name__}"
        )
    return [as_config(config_class, v, f"{name}[{i}]") for i, v in enumerate(value)]
