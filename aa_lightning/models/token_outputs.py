"""Causal families whose responses are not text: how to sample their tokens and what the tokens mean.

An autoregressive image model (Emu3) answers with image tokens. Sampling them is ordinary ``generate``, but
only a well-formed token grid decodes, and what a reward, a TensorBoard sample or ``aa predict`` needs is
the decoded image, not ``batch_decode`` text (which drops the visual tokens as special tokens). A family
that has such outputs registers a *codec* for its ``model_type``; the RL rollouts, ``aa predict`` and the
sample callbacks ask :func:`token_output_codec` and never name a modality.

A codec is built per model (``factory(model, tokenizer, processor)``) and has two methods:

* ``generation_overrides(metas) -> dict``: extra ``generate`` arguments for this prompt batch (a
  ``prefix_allowed_tokens_fn`` that keeps the grid, and ``max_new_tokens`` = the grid's length), or ``{}``
  when the rows ask for text (the family then generates text like any causal LM);
* ``decode(response_ids, metas) -> list``: one output per row (a ``PIL.Image`` for an image row).

Both read the row's ``meta``, where the datamodule writes what the output must be (e.g. an image row's
token grid ``height`` x ``width``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from aa_lightning.registry import Registry

__all__ = ["TokenOutputCodec", "describe_output", "register_token_outputs", "token_output_codec"]


class TokenOutputCodec(Protocol):
    def generation_overrides(self, metas: Sequence[dict[str, Any]]) -> dict[str, Any]: ...

    def decode(self, response_ids: torch.Tensor, metas: Sequence[dict[str, Any]]) -> list[Any]: ...


CodecFactory = Callable[[nn.Module, Any, Any], TokenOutputCodec]

_CODECS: Registry[CodecFactory] = Registry("token-output codec")


def register_token_outputs(model_type: str, factory: CodecFactory, *, override: bool = False) -> None:
    """Declare that models of ``model_type`` (``config.model_type``) answer with non-text tokens."""
    _CODECS.register(model_type, factory, override=override)


def _family(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (its config says which family it is)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def token_output_codec(model: nn.Module, tokenizer: Any, processor: Any = None) -> TokenOutputCodec | None:
    """The codec of ``model``'s family, or ``None`` for a text-only family (``model`` unwrapped already)."""
    family = _family(model)
    model_type = getattr(getattr(family, "config", None), "model_type", None)
    factory = _CODECS.get(model_type, None) if model_type else None
    return factory(family, tokenizer, processor) if factory is not None else None


def describe_output(output: Any) -> str:
    """A response as one line of a text table: the text itself, ``(image 32x32)`` for a decoded image."""
    if isinstance(output, str):
        return output
    size = getattr(output, "size", None)
    if isinstance(size, tuple) and len(size) == 2 and hasattr(output, "mode"):  # a PIL image
        return f"(image {size[0]}x{size[1]})"
    return f"({type(output).__name__})"
