"""Name -> formatter class registry, so configs can pick a dataset layout by a string ("Alpaca").

A config can also name a formatter that lives in user code as ``"package.module:ClassName"`` (as reward
functions allow): the module is imported when the data is prepared, so no registration call has to run before
the CLI starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from aa_lightning.data.formatters.base import BaseFormatter
from aa_lightning.registry import Registry, UnknownNameError, import_path_module, path_attribute

__all__ = [
    "UnknownTemplateError",
    "available_templates",
    "get_formatter",
    "get_formatter_class",
    "import_formatter_class",
    "register_template",
]

F = TypeVar("F", bound=type[BaseFormatter])


class UnknownTemplateError(UnknownNameError):
    """Raised for a template name that was never registered; the message lists the known names."""


_TEMPLATES: Registry[type[BaseFormatter]] = Registry(
    "template",
    error=UnknownTemplateError,
    hint=" (or 'package.module:ClassName' for a formatter in your own code)",
)


def register_template(name: str, *, override: bool = False) -> Callable[[F], F]:
    """Class decorator registering a :class:`BaseFormatter` subclass under ``name`` (case-sensitive).

    The rule of :class:`~aa_lightning.registry.Registry`: the same class again (also re-made by a reload) is
    fine; a *different* class under a taken name raises unless ``override=True``. A class may be registered
    under several names (aliases); the first one becomes its ``template_name``.
    """
    register = _TEMPLATES.register(name, override=override)  # checks the name now, not at class time

    def decorator(cls: F) -> F:
        if not (isinstance(cls, type) and issubclass(cls, BaseFormatter)):
            raise TypeError(f"@register_template({name!r}) expects a BaseFormatter subclass, got {cls!r}")
        register(cls)
        if cls.__dict__.get("template_name") is None:  # first name wins as the display name
            cls.template_name = name
        return cls

    return decorator


def available_templates() -> list[str]:
    """Registered template names, sorted."""
    return _TEMPLATES.names()


def import_formatter_class(path: str) -> type[BaseFormatter]:
    """The :class:`BaseFormatter` subclass at ``"package.module:ClassName"`` (the module is imported)."""
    module, attr = import_path_module(path, "template", UnknownTemplateError)
    if path in _TEMPLATES:  # the module registered its class under the full path
        return _TEMPLATES[path]
    cls = path_attribute(module, attr, path, "template", UnknownTemplateError)
    if not (isinstance(cls, type) and issubclass(cls, BaseFormatter)):
        raise TypeError(f"template {path!r} is {cls!r}, not a BaseFormatter subclass")
    return cls


def get_formatter_class(name: str) -> type[BaseFormatter]:
    """The class registered under ``name``, or imported from ``"package.module:ClassName"``; unknown names raise
    :class:`UnknownTemplateError`."""
    if isinstance(name, str) and name not in _TEMPLATES and ":" in name:
        return import_formatter_class(name)
    return _TEMPLATES.get(name)


def get_formatter(name: str, **kwargs: Any) -> BaseFormatter:
    """A fresh formatter instance for ``name``; ``kwargs`` (e.g. ``system_prompt``) go to its constructor."""
    return get_formatter_class(name)(**kwargs)
