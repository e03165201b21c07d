"""The :class:`Rollout` container and the pure tensor helpers that build it (no module state, no strategy).

Kept apart from the LightningModule so the algorithms, the tests and the benchmarks can build and slice
rollouts by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "TEXT_KEYS",
    "Rollout",
    "extend_per_token_inputs",
    "position_ids_from_mask",
    "repeat_batch_inputs",
    "response_mask_from_eos",
    "rollout_mean_kl",
]

TEXT_KEYS = ("input_ids", "attention_mask")


def response_mask_from_eos(
    response_ids: torch.Tensor, eos_token_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask (N, R) bool, has_eos (N,) bool)``: tokens up to and including the first EOS are kept.

    Everything after the first EOS (padding, or a second EOS when pad == eos) is masked; a response
    without EOS (cut at ``max_new_tokens``) keeps all its tokens and has ``has_eos == False``.
    """
    eos = torch.as_tensor(list(eos_token_ids), device=response_ids.device, dtype=response_ids.dtype)
    is_eos = torch.isin(response_ids, eos)
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()  # EOS tokens strictly before each position
    return eos_before == 0, is_eos.any(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (what ``generate`` uses): ``cumsum(mask) - 1`` clamped at 0."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def repeat_batch_inputs(
    inputs: dict[str, torch.Tensor], repeats: int, batch_size: int
) -> dict[str, torch.Tensor]:
    """Each prompt ``repeats`` times in a row (GRPO groups): batch-first tensors are ``repeat_interleave``-d.

    Tensors whose first dimension is not the batch size (media patches flattened over the batch, as some
    processors return) cannot be split per sample without knowing the model. With ONE prompt in the batch
    every row belongs to it, so each tensor is tiled ``repeats`` times along dim 0, which is right for any
    layout; with several prompts such inputs are refused with a clear message.
    """
    if repeats == 1:
        return dict(inputs)
    flat = [k for k, v in inputs.items() if v.dim() == 0 or v.shape[0] != batch_size]
    if not flat:
        return {key: value.repeat_interleave(repeats, dim=0) for key, value in inputs.items()}
    if batch_size == 1:
        return {
            key: value.repeat(repeats, *[1] * (value.dim() - 1)) if value.dim() > 0 else value
            for key, value in inputs.items()
        }
    key = flat[0]
    raise ValueError(
        f"cannot repeat model input {key!r} of shape {tuple(inputs[key].shape)} per sample (batch size "
        f"{batch_size}): its rows are not one per prompt; use batch_size 1 (per device) for this processor, "
        "or one sample per prompt"
    )


def extend_per_token_inputs(
    inputs: dict[str, torch.Tensor], prompt_ids: torch.Tensor, num_new_tokens: int
) -> dict[str, torch.Tensor]:
    """Extend the per-token model inputs of a prompt batch over ``num_new_tokens`` generated tokens.

    Rule (the batch contract of :mod:`aa_lightning.data.collators`): a per-token input is a non-float
    tensor with exactly the ``(N, prompt_len)`` shape of ``prompt_ids`` (e.g. ``mm_token_type_ids``,
    ``token_type_ids``); generated tokens are text, so it is padded with zeros, as ``generate`` itself
    does. Everything else (media tensors, float features) passes unchanged. ``input_ids`` and
    ``attention_mask`` are not expected here (the rollout builds them itself). A media tensor that is an
    integer ``(N, prompt_len)`` tensor by coincidence would be extended too (and then fail loudly in the
    model); no processor in use returns one.
    """
    if num_new_tokens <= 0:
        return dict(inputs)
    out = {}
    for key, value in inputs.items():
        if value.shape == prompt_ids.shape and not value.is_floating_point() and not value.is_complex():
            value = torch.cat([value, value.new_zeros(value.shape[0], num_new_tokens)], dim=1)
        out[key] = value
    return out


def rollout_mean_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL estimate ``sum_t (log p - log p_ref)`` over response tokens ``(N,)``."""
    return torch.where(mask, logprobs - ref_logprobs, torch.zeros_like(logprobs)).sum(dim=1)


@dataclass
class Rollout:
    """One batch of generated episodes. All tensors are batch-first with ``N`` rows (sequences).

    ``sequences`` = left-padded prompt (``prompt_length`` columns) + response (``R`` columns, padded after
    EOS). ``data`` holds per-sequence results the algorithms add (``old_logprobs`` (N, R), ``values``,
    ``scores`` (N,) ...).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    has_eos: torch.Tensor
    prompt_length: int
    extra_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    metas: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    @property
    def response_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]

    @property
    def response_length(self) -> int:
        return self.sequences.shape[1] - self.prompt_length

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.data[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.data[key] = value

    def model_inputs(self, with_position_ids: bool = True) -> dict[str, torch.Tensor]:
        """Forward inputs for prompt + response: the sequences plus every extra (media) input."""
        inputs = {**self.extra_inputs, "input_ids": self.sequences, "attention_mask": self.attention_mask}
        if with_position_ids and "position_ids" not in self.extra_inputs:
            inputs["position_ids"] = position_ids_from_mask(self.attention_mask)
        return inputs

    def select(self, index: torch.Tensor) -> Rollout:
        """The rows ``index`` (a minibatch); batch-first extras are sliced, others passed whole."""
        n = len(self)
        idx_list = index.tolist()

        def take(t: torch.Tensor) -> torch.Tensor:
            return t[index.to(t.device)] if t.dim() > 0 and t.shape[0] == n else t

        return Rollout(
            sequences=take(self.sequences),
            attention_mask=take(self.attention_mask),
            response_mask=take(self.response_mask),
            has_eos=take(self.has_eos),
            prompt_length=self.prompt_length,
            extra_inputs={k: take(v) for k, v in self.extra_inputs.items()},
            prompts=[self.prompts[i] for i in idx_list] if self.prompts else [],
            responses=[self.responses[i] for i in idx_list] if self.responses else [],
            metas=[self.metas[i] for i in idx_list] if self.metas else [],
            data={k: take(v) for k, v in self.data.items()},
        )
