"""The environment interface of multi-turn rollouts, and its registry.

An environment answers a policy turn: given the conversation so far (the prompt as first message, role
``prompt``: the text the chat template rendered, then the alternating ``assistant`` and environment messages) and the sample's meta, it returns the
next observation (tool results, a user turn) and whether the episode has ended, plus an optional reward for
the turn. It holds no per-episode state of its own (everything it needs is in the conversation), so one
instance serves every episode of every rank, and a resumed run replays the same episodes.

    from aa_lightning.environments import Environment, EnvironmentStep, register_environment

    @register_environment("retry_once")
    class RetryOnce(Environment):
        def step(self, conversation, meta):
            if len(conversation) > 2:
                return EnvironmentStep(done=True)
            return EnvironmentStep([{"role": "user", "content": "Check your answer."}])

A config names it ``environment: retry_once`` or ``{name: retry_once, kwargs: {...}}``, or
``package.module:Class`` for a class that is not registered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aa_lightning.registry import Registry, import_path_module, path_attribute

__all__ = [
    "CONVERSATION",
    "Environment",
    "EnvironmentSpec",
    "EnvironmentStep",
    "available_environments",
    "build_environment",
    "environment_class",
    "register_environment",
]

#: key of a multi-turn rollout's meta dicts: the episode as ``[{"role", "content"}, ...]`` (role ``prompt`` first).
CONVERSATION = "conversation"
Message = dict[str, Any]


@dataclass
class EnvironmentStep:
    """What an environment answers: ``messages`` to append (empty when ``done``), and this turn's reward."""

    messages: list[Message] = field(default_factory=list)
    done: bool = False
    reward: float = 0.0


class Environment:
    """Base class of environments; subclasses implement :meth:`step`."""

    def step(self, conversation: list[Message], meta: dict[str, Any]) -> EnvironmentStep:
        raise NotImplementedError


@dataclass
class EnvironmentSpec:
    """An environment of an RL config: a registered name or ``package.module:Class``, and its kwargs."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


_ENVIRONMENTS: Registry[type[Environment]] = Registry(
    "environment", hint=" (or 'package.module:Class' for a class in your own code)"
)


def register_environment(name: str, *, override: bool = False) -> Any:
    """Class decorator registering an :class:`Environment` subclass under ``name``."""
    return _ENVIRONMENTS.register(name, override=override)


def available_environments() -> list[str]:
    return _ENVIRONMENTS.names()


def environment_class(name: str) -> type[Environment]:
    """The class registered as ``name`` (an unknown name raises, listing the known ones)."""
    return _ENVIRONMENTS[name]


def build_environment(spec: str | dict[str, Any] | EnvironmentSpec | Environment) -> Environment:
    """An environment instance from a config value (a name, ``{name, kwargs}``, a spec, or an instance)."""
    if isinstance(spec, Environment):
        return spec
    if isinstance(spec, str):
        spec = EnvironmentSpec(spec)
    elif isinstance(spec, dict):
        unknown = set(spec) - {"name", "kwargs"}
        if "name" not in spec or unknown:
            raise ValueError(f"environment: expected {{name, kwargs}}, got keys {sorted(spec)}")
        spec = EnvironmentSpec(spec["name"], dict(spec.get("kwargs") or {}))
    name = spec.name
    if name in _ENVIRONMENTS:
        cls = _ENVIRONMENTS[name]
    elif ":" in name:
        module, attr = import_path_module(name, "environment")
        cls = path_attribute(module, attr, name, "environment")
    else:
        cls = _ENVIRONMENTS[name]  # raises, listing the known environments
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise TypeError(f"environment {name!r} is {cls!r}, not an Environment subclass")
    try:
        return cls(**spec.kwargs)
    except TypeError as err:
        raise TypeError(f"environment {name!r}: bad kwargs {sorted(spec.kwargs)}: {err}") from None
