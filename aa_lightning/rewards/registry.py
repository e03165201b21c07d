"""Registry of rule-based reward (and cost) functions used by the RL modules.

A reward function scores one response: ``fn(prompt: str, response: str, meta: dict, **kwargs) -> float``.
``prompt`` and ``response`` are decoded text (special tokens removed), ``meta`` is the sample's meta dict from
the datamodule (e.g. ``reference_answer`` for GSM8K). A *batched* function takes lists and returns one score
per sample, for rewards that are cheaper to compute together (a classifier, an external verifier).

Register with ``@register_reward("name")`` (or ``@register_reward("name", batched=True)``) and refer to it by
name in a config; ``"package.module:function"`` imports a module first, so a config can use a function that
lives in user code without any registration call before the CLI starts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from aa_lightning.registry import Registry, import_path_module, path_attribute

log = logging.getLogger(__name__)

__all__ = [
    "RegisteredReward",
    "RewardSpec",
    "WeightedRewards",
    "available_rewards",
    "get_reward",
    "register_reward",
]


@dataclass
class RewardSpec:
    """One reward term of an RL config: ``weight * name(prompt, response, meta, **kwargs)``.

    Args:
        name: a registered reward name, or ``"package.module:function"``.
        weight: factor of this term in the summed score.
        kwargs: extra keyword arguments passed to the function (e.g. ``{target: " the"}``).
    """

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


class RegisteredReward:
    """A reward function with a uniform batched call: ``(prompts, responses, metas) -> list[float]``."""

    def __init__(self, name: str, fn: Callable[..., Any], batched: bool = False) -> None:
        self.name = name
        self.fn = fn
        self.batched = batched

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], metas: Sequence[dict[str, Any]], **kwargs: Any
    ) -> list[float]:
        if not (len(prompts) == len(responses) == len(metas)):
            raise ValueError(
                f"reward {self.name!r}: got {len(prompts)} prompts, {len(responses)} responses, {len(metas)} metas"
            )
        if self.batched:
            out = [float(v) for v in self.fn(list(prompts), list(responses), list(metas), **kwargs)]
            if len(out) != len(prompts):
                raise ValueError(
                    f"batched reward {self.name!r} returned {len(out)} values for {len(prompts)} samples"
                )
        else:
            out = [float(self.fn(p, r, m, **kwargs)) for p, r, m in zip(prompts, responses, metas)]
        bad = [i for i, v in enumerate(out) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"reward {self.name!r} returned a non-finite value for samples {bad[:10]}")
        return out

    def __repr__(self) -> str:
        return f"RegisteredReward({self.name!r}, batched={self.batched})"


_REGISTRY: Registry[RegisteredReward] = Registry(
    "reward function",
    origin=lambda registered: registered.fn,  # the rule looks at the user's function, not the wrapper
    hint=" (or 'package.module:function' for a function in your own code)",
)


def register_reward(
    name: str, *, batched: bool = False, override: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn`` under ``name``; returns ``fn`` unchanged.

    The rule of :class:`~aa_lightning.registry.Registry`: the same function again (a re-run notebook cell)
    replaces it; a *different* function under an existing name raises unless ``override=True``, so a typo
    cannot silently shadow a built-in.
    """
    register = _REGISTRY.register(name, override=override)

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        register(RegisteredReward(name, fn, batched=batched))
        return fn

    return decorator


def available_rewards() -> list[str]:
    """Names of every registered reward function."""
    return _REGISTRY.names()


def get_reward(name: str) -> RegisteredReward:
    """The reward registered as ``name``; ``"module:function"`` imports ``module`` first."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module, attr = import_path_module(name, "reward")
        if name in _REGISTRY:  # the module registered itself under the full name
            return _REGISTRY[name]
        fn = path_attribute(module, attr, name, "reward")
        for registered in _REGISTRY.values():
            if registered.fn is fn:
                return registered
        return RegisteredReward(name, fn, batched=bool(getattr(fn, "batched", False)))
    return _REGISTRY.get(name)


class WeightedRewards:
    """A weighted sum of reward functions, evaluated together (what an RL module calls once per rollout)."""

    def __init__(self, specs: Sequence[RewardSpec | dict[str, Any]] | None) -> None:
        self.specs = [s if isinstance(s, RewardSpec) else RewardSpec(**s) for s in (specs or [])]
        self.functions = [get_reward(s.name) for s in self.specs]  # fail at build time on unknown names

    def __len__(self) -> int:
        return len(self.specs)

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], metas: Sequence[dict[str, Any]]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total (N,), {name: unweighted values (N,)})`` as float32 CPU tensors."""
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(responses), dtype=torch.float32)
        for spec, fn in zip(self.specs, self.functions):
            values = torch.tensor(fn(prompts, responses, metas, **spec.kwargs), dtype=torch.float32)
            key = spec.name if spec.name not in parts else f"{spec.name}_{len(parts)}"
            parts[key] = values
            total += spec.weight * values
        return total, parts


# Lightning reloads checkpoints with ``weights_only=True``; RL modules keep RewardSpecs in their hyper-parameters.
torch.serialization.add_safe_globals([RewardSpec])
