"""The :class:`Rollout` container and the pure tensor helpers that build it (no module state, no strategy).

Kept apart from the LightningModule so the algorithms, the tests and the benchmarks can build and slice
rollouts by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from aa_lightning.batch import select_media_rows, select_sequences
from aa_lightning.models.positions import position_ids_from_mask

__all__ = [
    "TEXT_KEYS",
    "Rollout",
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


def rollout_mean_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL estimate ``sum_t (log p - log p_ref)`` over response tokens ``(N,)``."""
    return torch.where(mask, logprobs - ref_logprobs, torch.zeros_like(logprobs)).sum(dim=1)


@dataclass
class Rollout:
    """One batch of generated episodes. All tensors are batch-first with ``N`` rows (sequences).

    ``sequences`` = left-padded prompt (``prompt_length`` columns) + response (``R`` columns, padded after
    EOS). ``extra_inputs`` are the prompt batch's other model inputs (media, per-token inputs extended over
    the response) and ``media_rows`` says whose rows the non-batch-first ones are
    (:data:`aa_lightning.batch.MEDIA_ROWS`). ``data`` holds per-sequence results the algorithms add
    (``old_logprobs`` (N, R), ``values``, ``scores`` (N,) ...).

    ``trajectory`` is set when the family sampled its own multi-step trajectories
    (:mod:`aa_lightning.models.trajectories`): its batch-first record of the steps; the response "tokens" are
    then the steps (their timesteps), all kept, and ``responses`` the decoded outputs.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    has_eos: torch.Tensor
    prompt_length: int
    extra_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    media_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    metas: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, torch.Tensor] = field(default_factory=dict)
    trajectory: dict[str, torch.Tensor] = field(default_factory=dict)

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
        """Forward inputs for prompt + response: the sequences plus every extra (media) input.

        ``with_position_ids``: positions that skip the left padding, for models that do not compute their
        own (:func:`aa_lightning.models.positions.computes_own_positions`).
        """
        inputs = {**self.extra_inputs, "input_ids": self.sequences, "attention_mask": self.attention_mask}
        if with_position_ids and "position_ids" not in self.extra_inputs:
            inputs["position_ids"] = position_ids_from_mask(self.attention_mask)
        return inputs

    def select(self, index: torch.Tensor) -> Rollout:
        """The sequences ``index`` (a minibatch or a chunk), each with its own media rows."""
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
            extra_inputs=select_sequences(self.extra_inputs, index, n, self.media_rows),
            media_rows=select_media_rows(self.media_rows, index),
            prompts=[self.prompts[i] for i in idx_list] if self.prompts else [],
            responses=[self.responses[i] for i in idx_list] if self.responses else [],
            metas=[self.metas[i] for i in idx_list] if self.metas else [],
            data={k: take(v) for k, v in self.data.items()},
            trajectory={k: take(v) for k, v in self.trajectory.items()},
        )
