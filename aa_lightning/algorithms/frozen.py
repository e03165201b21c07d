"""One home for the frozen models of a run: the reference policy, the reward model, the cost model.

Why one component, and why inside the module tree:

* **Built like the policy.** Algorithms load frozen models in ``configure_model``, where the policy is
  built, so under ZeRO-3 they are sharded at construction (``deepspeed.zero.Init``) and gathered one layer at
  a time by the engine's hooks when they run. Each rank then holds ``1/world_size`` of every frozen model.
  (The alternative, a DeepSpeed inference engine per frozen model, keeps a full replica on every rank unless
  tensor parallelism is set up; for models trained with ZeRO-3, i.e. models that do not fit one device
  comfortably, the sharded copy is the one that fits, and it needs no second engine or config.)
* **Cast like the policy.** Being submodules of the ``LightningModule``, they receive whatever the strategy
  and precision plugin do to the policy: DeepSpeed's bf16 cast, ``bf16-true`` conversion, device moves;
  under ``bf16-mixed`` they run in the same autocast region. So at step 0 the policy/reference log-ratio is
  exactly 0 whatever the precision.
* **Never trained, never stored.** Parameters have ``requires_grad=False`` (DDP and the optimizers ignore
  them), the component stays in eval mode when Lightning calls ``.train()`` on the module, and
  :class:`~aa_lightning.algorithms.base.AlignModule` leaves them out of (non-DeepSpeed) checkpoints: they are
  reloaded from their paths.
* **LoRA needs no copy.** The reference of a LoRA policy is the policy with its adapters switched off.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from aa_lightning.models.unwrap import unwrap

__all__ = ["FROZEN_PREFIX", "FrozenModels", "freeze"]

FROZEN_PREFIX = "frozen."
"""State-dict prefix of every frozen model (the attribute name of the component on the module)."""


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: what every frozen model is."""
    model.eval()
    model.requires_grad_(False)
    return model


class FrozenModels(nn.Module):
    """Frozen models by role (``"reference"``, ``"reward"``, ``"cost"``, ...), with their tokenizers and paths.

    A role is either a stored model (:meth:`add`) or "the policy with its adapters off"
    (:meth:`use_policy_without_adapters`). :meth:`running` yields the model to call for a role, under
    ``torch.no_grad``, whichever of the two it is.
    """

    def __init__(self) -> None:
        super().__init__()
        self.models = nn.ModuleDict()
        self.tokenizers: dict[str, Any] = {}
        self.paths: dict[str, str] = {}
        self.adapter_roles: set[str] = set()

    # -- building --------------------------------------------------------------------------------------
    def add(self, role: str, model: nn.Module, tokenizer: Any = None, path: str | None = None) -> nn.Module:
        """Store ``model`` (frozen) under ``role``; its ``tokenizer`` and source ``path`` travel with it."""
        self.adapter_roles.discard(role)
        self.models[role] = freeze(model)
        self.tokenizers[role] = tokenizer
        if path is not None:
            self.paths[role] = path
        return model

    def use_policy_without_adapters(self, role: str = "reference") -> None:
        """``role`` is served by the (LoRA) policy with its adapters disabled: no second copy of the weights."""
        self.release(role)
        self.adapter_roles.add(role)

    def release(self, role: str) -> None:
        """Drop ``role`` and free its memory (e.g. the reference once its log-probs are precomputed)."""
        self.adapter_roles.discard(role)
        self.tokenizers.pop(role, None)
        if role in self.models:
            del self.models[role]
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # -- lookup ----------------------------------------------------------------------------------------
    def __contains__(self, role: object) -> bool:
        return role in self.models or role in self.adapter_roles

    def get(self, role: str) -> nn.Module | None:
        """The stored model of ``role`` (None when absent or served by the policy without adapters)."""
        return self.models[role] if role in self.models else None

    def tokenizer(self, role: str) -> Any:
        return self.tokenizers.get(role)

    def path(self, role: str) -> str | None:
        return self.paths.get(role)

    @contextlib.contextmanager
    def running(self, role: str, policy: nn.Module | None = None) -> Iterator[nn.Module]:
        """Yield the model that plays ``role`` (``policy`` with adapters off for adapter roles), no grad."""
        with torch.no_grad():
            if role in self.adapter_roles:
                if policy is None:
                    raise RuntimeError(f"the {role!r} model is the policy without adapters: pass the policy")
                was_training = policy.training
                policy.eval()  # a reference is deterministic: no dropout, as for stored frozen models
                try:
                    with unwrap(policy).disable_adapter():
                        yield policy
                finally:
                    policy.train(was_training)
                return
            if role not in self.models:
                raise RuntimeError(f"no {role!r} model is loaded")
            yield self.models[role]

    # -- modes -----------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenModels:
        """Frozen models stay in eval mode (no dropout) when Lightning switches the module to training."""
        return super().train(False)
