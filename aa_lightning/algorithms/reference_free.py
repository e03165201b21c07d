"""Deprecated: ``ReferenceFreeModule(loss_type=...)``, now :class:`SimPOModule` and :class:`ORPOModule`.

Kept so existing configs (``class_path: aa_lightning.algorithms.ReferenceFreeModule``) and code still run:
constructing it returns the named module, with only the arguments that module takes.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from aa_lightning.algorithms.orpo import ORPOModule
from aa_lightning.algorithms.policy import PolicyModule
from aa_lightning.algorithms.simpo import SimPOModule

__all__ = ["ReferenceFreeModule"]


class ReferenceFreeModule(PolicyModule):
    """Deprecated alias: ``loss_type="simpo"`` builds a :class:`SimPOModule`, ``"orpo"`` an :class:`ORPOModule`.

    Args:
        loss_type: ``simpo`` or ``orpo``.
        beta: SimPO reward scale (default: :class:`SimPOModule`'s).
        gamma: SimPO target reward margin (default: :class:`SimPOModule`'s).
        label_smoothing: SimPO label smoothing (default: :class:`SimPOModule`'s).
        orpo_lambda: ORPO weight of the odds-ratio term (default: :class:`ORPOModule`'s).

    The arguments of the other method are ignored, as they always were. (The CLI's parser reads the signature of
    ``__new__``; the other arguments are :class:`~aa_lightning.algorithms.base.AlignModule`'s.)
    """

    data_kind = "preference"

    def __new__(  # type: ignore[misc]
        cls,
        *args: Any,
        loss_type: Literal["simpo", "orpo"] = "simpo",
        beta: float | None = None,
        gamma: float | None = None,
        label_smoothing: float | None = None,
        orpo_lambda: float | None = None,
        **kwargs: Any,
    ) -> SimPOModule | ORPOModule:
        # no super() here: Lightning's save_hyperparameters walks the __init__ frames that hold __class__.
        # Each branch calls its module by name so the CLI's parser can follow **kwargs into it.
        if loss_type not in ("simpo", "orpo"):
            raise ValueError(f"unknown loss_type {loss_type!r}; expected 'simpo' or 'orpo'")
        named = "SimPOModule" if loss_type == "simpo" else "ORPOModule"
        warnings.warn(
            f"ReferenceFreeModule(loss_type={loss_type!r}) is deprecated: use {named}",
            DeprecationWarning,
            stacklevel=2,
        )
        # None: the named module's default (stated there once); the other method's arguments are ignored
        if loss_type == "simpo":
            kwargs.update(_given(beta=beta, gamma=gamma, label_smoothing=label_smoothing))
            return SimPOModule(*args, **kwargs)
        kwargs.update(_given(orpo_lambda=orpo_lambda))
        return ORPOModule(*args, **kwargs)


def _given(**values: Any) -> dict[str, Any]:
    """The arguments that were given (not None)."""
    return {k: v for k, v in values.items() if v is not None}
