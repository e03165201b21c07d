"""The contract between the RL modules and whatever samples their responses (a rollout engine).

An algorithm never names an engine: :meth:`~aa_lightning.algorithms.rl.generation.GenerationMixin.generate_rollout`
builds one :class:`EngineRequest` per rollout (the prompt batch, already repeated ``num_samples`` times, and the
resolved sampling settings) and gets back :class:`EngineCompletions` (response token ids, the log-probs the engine
sampled them with when it reports them, finish reasons). Which engine answers is the ``rollout_engine`` config
key (:mod:`.registry`). The engine is told when the policy's weights changed (:meth:`RolloutEngine.on_weights_updated`),
so an engine holding its own copy of the weights (vLLM) re-syncs before it samples again: sampling from stale
weights is what made align-anything's ``ppo_vllm`` train on its initial policy.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

if TYPE_CHECKING:
    from aa_lightning.algorithms.rl.module import OnlineRLModule

__all__ = ["EngineCompletions", "EngineRequest", "FinishReason", "RolloutEngine", "SamplingSettings"]

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingSettings:
    """The resolved sampling settings of one request (``top_k == 0``: off; ``temperature`` is ignored greedy)."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


@dataclass
class EngineRequest:
    """One batch of prompts to complete, one completion per row.

    Args:
        inputs: every model input of the prompt rows (left-padded ``input_ids`` / ``attention_mask``, media
            tensors), rows already repeated for the samples of a prompt (groups contiguous).
        sampling: what to sample with.
        seed: the rollout's seed (derived from ``(rollout_seed, rollout index, rank)``): the same request with
            the same seed samples the same tokens, so a resumed run samples what the uninterrupted one did.
        seed_offset: the offset ``seed`` was derived with (the module's ``seeded(offset)`` context reads it).
        do_sample: the caller's ``do_sample`` argument as given (None: the configured one).
        generate_overrides: ``generate`` constraints of a family whose outputs are not text (an image's token
            grid, :mod:`aa_lightning.models.token_outputs`); an engine that cannot honour them refuses them.
        metas: per-row metadata of the prompts.
    """

    inputs: dict[str, torch.Tensor]
    sampling: SamplingSettings
    seed: int
    seed_offset: int = 0
    do_sample: bool | None = None
    generate_overrides: dict[str, Any] = field(default_factory=dict)
    metas: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.inputs["input_ids"].shape[0])

    def prompt_token_ids(self) -> list[list[int]]:
        """Each row's prompt tokens without its left padding (what an engine that takes token lists reads)."""
        ids, mask = self.inputs["input_ids"], self.inputs["attention_mask"].bool()
        return [row[keep].tolist() for row, keep in zip(ids, mask)]

    def media_keys(self) -> list[str]:
        """Model inputs other than the text ones (pixel values, audio features ...)."""
        return [k for k in self.inputs if k not in ("input_ids", "attention_mask")]


@dataclass
class EngineCompletions:
    """What an engine sampled for an :class:`EngineRequest`, row for row.

    Args:
        response_ids: ``(N, R)`` sampled tokens, right-padded with the pad token after each response's end
            (tokens up to and including the first EOS are the response).
        logprobs: ``(N, R)`` float32 log-probs of those tokens under the distribution the engine sampled from
            (temperature applied; 0 over the padding), or None when the engine does not report them (the
            trainer's recomputed log-probs are then the only ones).
        finish_reasons: ``"stop"`` (an EOS ended it) or ``"length"`` (cut at ``max_new_tokens``) per row.
    """

    response_ids: torch.Tensor
    logprobs: torch.Tensor | None
    finish_reasons: list[FinishReason]

    def __post_init__(self) -> None:
        n, r = self.response_ids.shape
        if self.logprobs is not None and tuple(self.logprobs.shape) != (n, r):
            raise ValueError(
                f"engine log-probs have shape {tuple(self.logprobs.shape)}, responses ({n}, {r})"
            )
        if len(self.finish_reasons) != n:
            raise ValueError(f"{len(self.finish_reasons)} finish reasons for {n} responses")


class RolloutEngine(ABC):
    """Samples responses for an RL module. One instance per module, created on the first rollout.

    Subclasses register under a name (:func:`~.registry.register_rollout_engine`) and take their options as
    keyword arguments (the config's ``rollout_engine_args``).
    """

    name: ClassVar[str] = ""
    #: whether :attr:`EngineCompletions.logprobs` is filled (the sampling-gap metric and TIS need it)
    reports_logprobs: ClassVar[bool] = False

    def session(self, module: OnlineRLModule, request: EngineRequest) -> contextlib.AbstractContextManager:
        """Context held around :meth:`generate` AND the decoding of its responses (an image family decodes its
        token grid with its own weights, gathered under ZeRO-3 by the default engine's session)."""
        return contextlib.nullcontext()

    @abstractmethod
    def generate(self, module: OnlineRLModule, request: EngineRequest) -> EngineCompletions:
        """Sample one completion per request row."""

    def max_sequence_length(self, module: OnlineRLModule) -> int | None:
        """The longest prompt + response one request may have (None: no limit). A multi-turn episode whose
        next request would exceed it ends before it (:mod:`~aa_lightning.algorithms.rl.multi_turn`)."""
        return None

    def before_policy_update(self, module: OnlineRLModule) -> None:
        """Called before the forwards of every minibatch of an update phase (the rollout is done): an engine
        holding device memory may release it until its next :meth:`generate` (vLLM's sleep mode). Called once
        per minibatch, so it must be cheap when already released. The default engine holds nothing."""
        return None

    def on_weights_updated(self, module: OnlineRLModule) -> None:
        """Called after every optimizer update of the policy: an engine with its own weights must not sample
        from the old ones again. The default engine samples with the trained weights themselves: nothing to do."""
        return None

    def close(self) -> None:
        """Release what the engine holds (processes, device memory); the default engine holds nothing."""
        return None
