"""Every DeepSpeed call of the RL modules, behind one small adapter.

The RL modules drive several minibatches (and ``generate``) inside ONE Lightning ``training_step``, which
DeepSpeed's engine does not expect, so they reach below its public surface. The private APIs used here,
all of them, listed once (``tests/test_rl_engine.py`` checks each exists in the installed DeepSpeed and
fails loudly when one is renamed):

* ``ZeROOptimizer.clear_backward_seen_flag()`` (ZeRO-1/2/3 optimizers): what ``DeepSpeedEngine.forward``
  calls to start a micro-batch; without it ZeRO-3 overwrites earlier minibatches' gradient partitions.
* ``DeepSpeedZeroOptimizer_Stage3.parameter_offload`` (a ``DeepSpeedZeRoOffload``), and on it
  ``forward_hooks`` / ``backward_hooks`` (the per-module fetch/release hook handles), ``module`` and
  ``_register_deepspeed_module(module)`` (registers those hooks again): lifted while ``generate`` runs on
  gathered weights.
* ``param.ds_active_sub_modules`` (a set on every ZeRO-3 parameter): cleared so the gathered parameters are
  not released by modules that are still marked active.

Public APIs used: ``DeepSpeedEngine.zero_optimization_stage()``, ``set_gradient_accumulation_boundary()``,
``get_global_grad_norm()`` and ``deepspeed.zero.GatheredParameters``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["PRIVATE_APIS", "DeepSpeedAdapter", "missing_private_apis", "zero3_generation_context"]

# (module, class, attribute, how it is found): "attr" is a class attribute, "init" an attribute assigned in the
# class's source (instance state), "param" an attribute set on parameters in the module's source
PRIVATE_APIS: tuple[tuple[str, str, str, str], ...] = (
    ("deepspeed.runtime.base_optimizer", "ZeROOptimizer", "clear_backward_seen_flag", "attr"),
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", "parameter_offload", "init"),
    ("deepspeed.runtime.zero.parameter_offload", "DeepSpeedZeRoOffload", "forward_hooks", "init"),
    ("deepspeed.runtime.zero.parameter_offload", "DeepSpeedZeRoOffload", "backward_hooks", "init"),
    ("deepspeed.runtime.zero.parameter_offload", "DeepSpeedZeRoOffload", "module", "init"),
    (
        "deepspeed.runtime.zero.parameter_offload",
        "DeepSpeedZeRoOffload",
        "_register_deepspeed_module",
        "attr",
    ),
    ("deepspeed.runtime.zero.partition_parameters", "", "ds_active_sub_modules", "param"),
)


def missing_private_apis() -> list[str]:
    """The entries of :data:`PRIVATE_APIS` the installed DeepSpeed lacks (empty when all are there)."""
    missing = []
    for module_name, class_name, attr, kind in PRIVATE_APIS:
        where = f"{module_name}.{class_name}.{attr}" if class_name else f"{module_name}: {attr}"
        try:
            module = importlib.import_module(module_name)
            owner = getattr(module, class_name) if class_name else module
        except (ImportError, AttributeError):
            missing.append(where)
            continue
        if kind == "attr":
            found = hasattr(owner, attr)
        elif kind == "init":
            found = f"self.{attr} =" in inspect.getsource(owner)
        else:
            found = f".{attr} =" in inspect.getsource(owner)
        if not found:
            missing.append(where)
    return missing


@contextlib.contextmanager
def zero3_generation_context(engine: Any, model: nn.Module) -> Iterator[None]:
    """Gather ``model``'s ZeRO-3 shards ONCE and lift the per-module fetch/release hooks while inside.

    Without this, every decoding step of ``generate`` would all-gather each layer again (the post-forward
    hooks release the parameters after each layer). The hooks are registered again on exit and the
    parameters re-partitioned by ``GatheredParameters``.
    """
    import deepspeed

    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if offload is None:
            yield
            return
        for param in params:
            param.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


class DeepSpeedAdapter:
    """What the RL modules ask of a DeepSpeed engine; ``engine`` None (no DeepSpeed) makes every call a no-op."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    @property
    def active(self) -> bool:
        return self.engine is not None

    def zero_stage(self) -> int:
        return int(self.engine.zero_optimization_stage()) if self.engine is not None else 0

    def start_micro_batch(self) -> None:
        """What ``DeepSpeedEngine.forward`` does at the start of a micro-batch (see the module docstring)."""
        clear = getattr(getattr(self.engine, "optimizer", None), "clear_backward_seen_flag", None)
        if callable(clear):
            clear()

    def set_accumulation_boundary(self, last_in_group: bool) -> None:
        if self.engine is not None:
            self.engine.set_gradient_accumulation_boundary(last_in_group)

    def global_grad_norm(self, device: torch.device) -> torch.Tensor | None:
        """The norm of the last step (a tensor stays on its device, no host sync); None when not reported."""
        norm = self.engine.get_global_grad_norm() if self.engine is not None else None
        if norm is None:
            return None
        return torch.as_tensor(norm, device=device, dtype=torch.float32)

    def generation_context(self, model: nn.Module, gather: bool) -> contextlib.AbstractContextManager:
        """ZeRO-3 with ``gather``: the actor gathered once for ``generate``; otherwise nothing."""
        if self.engine is not None and gather and self.zero_stage() == 3:
            return zero3_generation_context(self.engine, model)
        return contextlib.nullcontext()
