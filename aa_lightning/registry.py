"""One registry type for every name -> object table the configs refer to (formatters, rewards, model classes).

A config names a formatter, a reward function or a model class by a string; each of those tables is a
:class:`Registry`, so all of them follow one rule and fail the same way:

- registering an object again under its name is fine: the very same object, or the same definition made
  anew by a module reload or a re-run notebook cell (same ``__module__`` and ``__qualname__``; the newest
  one is kept);
- a *different* object under a taken name raises, unless ``override=True``, so two plugins (or a typo) cannot
  silently shadow each other;
- an unknown name raises :class:`UnknownNameError` (a ``KeyError``) that lists the known names and suggests
  close ones.

This module imports nothing from the package, so every layer can use it.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, Generic, TypeVar, overload

__all__ = ["Registry", "UnknownNameError", "import_path_module", "path_attribute"]

V = TypeVar("V")
_MISSING: Any = object()


class UnknownNameError(KeyError):
    """A name that was never registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would otherwise show the repr of the message
        return str(self.args[0]) if self.args else ""


def _definition(obj: object) -> tuple[str, str] | None:
    """``(module, qualified name)`` of a class or function: what stays the same across a module reload."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return (module, qualname) if isinstance(module, str) and isinstance(qualname, str) else None


class Registry(Generic[V]):
    """A named ``name -> value`` table with one re-registration rule and helpful lookup errors.

    Args:
        kind: what a name names, for messages (``"template"`` -> "unknown template 'x'; known templates: ...").
        origin: the object whose identity and definition stand for a value (default: the value itself), for
            tables that store a wrapper around the user's object.
        error: the :class:`UnknownNameError` subclass raised for an unknown name.
        hint: appended to that error's message (e.g. how to name an object that is not registered).
    """

    def __init__(
        self,
        kind: str,
        *,
        origin: Callable[[V], object] | None = None,
        error: type[UnknownNameError] = UnknownNameError,
        hint: str = "",
    ) -> None:
        self.kind = kind
        self._origin = origin
        self._error = error
        self._hint = hint
        self._entries: dict[str, V] = {}

    # ----------------------------------------------------------------------------------------- registering
    @overload
    def register(self, name: str, *, override: bool = ...) -> Callable[[V], V]: ...

    @overload
    def register(self, name: str, value: V, *, override: bool = ...) -> V: ...

    def register(self, name: str, value: Any = _MISSING, *, override: bool = False) -> Any:
        """Register ``value`` under ``name`` and return it; without ``value``, a decorator that does so."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if value is _MISSING:
            return lambda v: self.register(name, v, override=override)
        existing = self._entries.get(name, _MISSING)
        if existing is not _MISSING and not override and not self.is_same(existing, value):
            raise ValueError(
                f"{self.kind} {name!r} is already registered to {self.describe(existing)}; "
                f"pass override=True to replace it with {self.describe(value)}"
            )
        self._entries[name] = value
        return value

    def is_same(self, a: V, b: V) -> bool:
        """Whether ``b`` is ``a`` again: the same object, or the same definition re-made by a reload."""
        a_obj, b_obj = self._unwrap(a), self._unwrap(b)
        if a_obj is b_obj:
            return True
        definition = _definition(a_obj)
        return definition is not None and definition == _definition(b_obj)

    def describe(self, value: V) -> str:
        """``module.QualifiedName`` of a value (its repr when it has none), for messages."""
        obj = self._unwrap(value)
        definition = _definition(obj)
        return ".".join(definition) if definition else repr(obj)

    def pop(self, name: str, default: Any = _MISSING) -> Any:
        """Remove ``name`` and return its value (``default`` if given and ``name`` is unknown)."""
        if name in self:
            return self._entries.pop(name)
        if default is not _MISSING:
            return default
        raise self.unknown(name)

    def copy(self) -> Registry[V]:
        """A registry with the same settings and entries (tests register into a copy)."""
        clone: Registry[V] = Registry(self.kind, origin=self._origin, error=self._error, hint=self._hint)
        clone._entries = dict(self._entries)
        return clone

    # -------------------------------------------------------------------------------------------- looking up
    def get(self, name: str, default: Any = _MISSING) -> Any:
        """The value of ``name``; an unknown name raises :class:`UnknownNameError` unless ``default`` is given.

        (Unlike ``dict.get`` there is no silent ``None``: pass ``default=None`` to ask for one.)
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable "name" from a config (a list, a dict)
            if default is not _MISSING:
                return default
            raise self.unknown(name) from None

    def __getitem__(self, name: str) -> V:
        return self.get(name)

    def unknown(self, name: object) -> UnknownNameError:
        """The error for an unknown ``name``: close matches (case-insensitive first), then every known name."""
        known = self.names()
        hint = ""
        if isinstance(name, str):
            lowered = {n.lower(): n for n in known}
            close = [lowered[name.lower()]] if name.lower() in lowered else []
            close = close or difflib.get_close_matches(name, known, n=3)
            if close:
                hint = f"; did you mean {', '.join(repr(c) for c in close)}? (names are case-sensitive)"
        return self._error(
            f"unknown {self.kind} {name!r}{hint}; known {self.kind}s: {', '.join(known) or 'none'}{self._hint}"
        )

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def keys(self) -> list[str]:
        """The registered names (sorted), so that ``dict(registry)`` works."""
        return self.names()

    def values(self) -> list[V]:
        return [self._entries[n] for n in self.names()]

    def items(self) -> list[tuple[str, V]]:
        return [(n, self._entries[n]) for n in self.names()]

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:  # unhashable
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()!r})"

    def _unwrap(self, value: V) -> object:
        return value if self._origin is None else self._origin(value)


def import_path_module(
    path: str, kind: str, error: type[Exception] = UnknownNameError
) -> tuple[ModuleType, str]:
    """Import the module of a ``"package.module:attr"`` name; returns ``(module, attr)``.

    Every table that also accepts an importable name (formatters, rewards, environments, tools, evaluation
    tasks) goes through here, so the syntax and its errors are one: a malformed name, or a module that is not
    there, raises ``error`` naming the ``kind`` and the name; a module that exists but fails on one of *its*
    imports keeps its own traceback.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise error(f"{kind} {path!r}: write an imported {kind} as 'package.module:name'")
    try:
        return importlib.import_module(module_name), attr
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name == err.name or module_name.startswith(f"{err.name}.")):
            raise
        raise error(
            f"{kind} {path!r}: no module named {err.name!r} (is the package installed or on PYTHONPATH?)"
        ) from None


def path_attribute(
    module: ModuleType, attr: str, path: str, kind: str, error: type[Exception] = UnknownNameError
) -> Any:
    """``module.attr`` (``attr`` may be dotted: ``Outer.Inner``), or ``error`` naming what is missing."""
    found: Any = module
    for part in attr.split("."):
        if not hasattr(found, part):
            raise error(f"{kind} {path!r}: module {module.__name__!r} has no attribute {attr!r}")
        found = getattr(found, part)
    return found
