"""Rollout engines by name: the ``rollout_engine`` config key of the RL modules names one of these."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aa_lightning.algorithms.rl.rollout_engines.base import RolloutEngine
from aa_lightning.registry import Registry

__all__ = ["build_rollout_engine", "engine_class", "register_rollout_engine", "rollout_engine_names"]

_ENGINES: Registry[type[RolloutEngine]] = Registry("rollout engine")


def register_rollout_engine(
    name: str, *, override: bool = False
) -> Callable[[type[RolloutEngine]], type[RolloutEngine]]:
    """Class decorator: make a :class:`RolloutEngine` subclass selectable as ``rollout_engine: <name>``."""

    def decorate(cls: type[RolloutEngine]) -> type[RolloutEngine]:
        if not (isinstance(cls, type) and issubclass(cls, RolloutEngine)):
            raise TypeError(f"rollout engine {name!r} must be a RolloutEngine subclass, got {cls!r}")
        cls.name = name
        return _ENGINES.register(name, cls, override=override)

    return decorate


def rollout_engine_names() -> list[str]:
    return _ENGINES.names()


def build_rollout_engine(name: str, args: dict[str, Any] | None = None) -> RolloutEngine:
    """The engine ``name`` built with ``args`` (an unknown name lists the known ones; bad args name the engine)."""
    cls = _ENGINES.get(name)
    try:
        return cls(**(args or {}))
    except TypeError as err:
        raise TypeError(f"rollout_engine_args for rollout engine {name!r}: {err}") from err


def engine_class(name: str) -> type[RolloutEngine]:
    """The registered class of ``name`` (what it reports is read without building it)."""
    return _ENGINES.get(name)
