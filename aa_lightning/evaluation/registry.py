"""The task registry: ``@register_task("name")`` classes, or any ``package.module:ClassName`` from a config.

Why a registry: a config names a task by a short word (``gsm8k``, ``preference_accuracy``), ``aa list eval``
shows them all, and a user's own task needs no change here (``task: my_pkg.tasks:MyTask``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aa_lightning.registry import import_path_module, path_attribute

TASKS: dict[str, type] = {}


def register_task(name: str, *, override: bool = False) -> Callable[[type], type]:
    """Register an :class:`~aa_lightning.evaluation.task.EvalTask` subclass under ``name``."""

    def wrap(cls: type) -> type:
        if name in TASKS and TASKS[name] is not cls and not override:
            raise ValueError(f"evaluation task {name!r} is already registered ({TASKS[name].__qualname__})")
        TASKS[name] = cls
        cls.task_name = name
        return cls

    return wrap


def available_tasks() -> list[str]:
    import aa_lightning.evaluation.tasks  # noqa: F401  (registers the built-in tasks)

    return sorted(TASKS)


def resolve_task(name: str) -> type:
    """The task class of ``name``: a registered name or ``module:Class`` (imported, no registration needed)."""
    import aa_lightning.evaluation.tasks  # noqa: F401

    if ":" in name:
        module, attr = import_path_module(name, "evaluation task", ValueError)
        cls: Any = path_attribute(module, attr, name, "evaluation task", ValueError)
        return cls
    if name not in TASKS:
        raise ValueError(f"unknown evaluation task {name!r}; registered: {', '.join(sorted(TASKS))}")
    return TASKS[name]
