"""Working beside DeepSpeed's ``zero.Init``: pausing it, and importing model code before it can bite.

Lightning runs ``configure_model`` inside ``deepspeed.zero.Init`` under ZeRO-3. While that context is open,
DeepSpeed wraps the ``__init__`` of every ``nn.Module`` subclass, including classes *created* while it is
open, and on exit it puts back the ``__init__`` it saw when it wrapped them. A model class whose module
transformers imports lazily inside the context is wrapped the moment it is created, before its class
decorators run; so a decorator that replaces ``__init__`` (the ``kernels`` package's ``use_kernelized_func``
in transformers >= 5.25, which sets up ``_kernel_funcs`` there) is undone on exit, and every instance built
afterwards (an export, a second load) fails in ``forward``. Importing the model's code with the context
paused gives DeepSpeed the finished class.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def outside_zero3_init() -> Iterator[None]:
    """Run the body with DeepSpeed's ``zero.Init`` paused (a no-op when it is not active or not installed)."""
    try:
        from deepspeed.runtime.zero import partition_parameters as zero_params
    except ImportError:
        yield
        return
    active = zero_params.top_level_context is not None
    if active:
        zero_params.shutdown_init_context()
    try:
        yield
    finally:
        if active:
            zero_params.restore_init_context()


def _configs(config: Any) -> Iterator[Any]:
    """``config`` and its sub-configs (text, vision, audio towers), each once."""
    from transformers import PretrainedConfig

    seen: set[int] = set()
    stack = [config]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend(v for v in vars(current).values() if isinstance(v, PretrainedConfig))


def modeling_modules(config: Any) -> list[str]:
    """The modeling modules beside each (sub-)config's ``configuration_*`` module (transformers' layout)."""
    names = []
    for current in _configs(config):
        package, _, leaf = type(current).__module__.rpartition(".")
        if package and leaf.startswith("configuration_"):
            name = f"{package}.modeling_{leaf.removeprefix('configuration_')}"
            if name not in names:
                names.append(name)
    return names


def import_model_code(config: Any) -> None:
    """Import the modules that define ``config``'s model classes with ``zero.Init`` paused (module docstring)."""
    with outside_zero3_init():
        for name in modeling_modules(config):
            try:
                importlib.import_module(name)
            except ModuleNotFoundError:
                continue  # a config without a modeling module of that name: nothing to import early
