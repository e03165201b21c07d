"""The default rollout engine: the policy's own KV-cached ``generate`` (transformers), in the training process.

It samples with the trained weights themselves, so there is nothing to sync; every model input of the prompt
batch (media included) goes to ``generate``. The session puts the actor in eval mode, seeds the torch RNG for
the rollout (``torch.random.fork_rng``: the global RNG is left alone) and, under ZeRO-3, gathers the actor
once per rollout (``zero3_gather_for_generation``); ``synced_gpus`` is set with more than one process. Its
length limit (multi-turn transcripts) is the model config's ``max_position_embeddings``, when it has one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aa_lightning.algorithms.rl.rollout import response_mask_from_eos
from aa_lightning.algorithms.rl.rollout_engines.base import (
    EngineCompletions,
    EngineRequest,
    FinishReason,
    RolloutEngine,
)
from aa_lightning.algorithms.rl.rollout_engines.registry import register_rollout_engine
from aa_lightning.models.unwrap import unwrap

if TYPE_CHECKING:
    from aa_lightning.algorithms.rl.module import OnlineRLModule

__all__ = ["HFGenerateEngine"]


@register_rollout_engine("hf")
class HFGenerateEngine(RolloutEngine):
    """``model.generate`` with a fresh ``GenerationConfig`` of exactly the configured sampling settings."""

    reports_logprobs = False

    @contextlib.contextmanager
    def session(self, module: OnlineRLModule, request: EngineRequest) -> Iterator[None]:
        actor = module.model
        was_training = actor.training
        actor.eval()
        try:
            with module.seeded(request.seed_offset), module.generation_context():
                yield
        finally:
            actor.train(was_training)

    def max_sequence_length(self, module: OnlineRLModule) -> int | None:
        """The model config's ``max_position_embeddings`` (the positions it was trained for), if it has one."""
        config = getattr(unwrap(module.model), "config", None)
        if config is None:
            return None
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = getattr(text, "max_position_embeddings", None)
        return int(limit) if isinstance(limit, int) and limit > 0 else None

    def generate(self, module: OnlineRLModule, request: EngineRequest) -> EngineCompletions:
        overrides = dict(request.generate_overrides)
        kwargs = module.generation_kwargs(request.do_sample)
        if "max_new_tokens" in overrides:  # the family's outputs have a fixed length (an image's token grid)
            kwargs["generation_config"].max_new_tokens = overrides.pop("max_new_tokens")
        prompt_length = request.inputs["input_ids"].shape[1]
        sequences = module.model.generate(**request.inputs, **kwargs, **overrides)
        response = sequences[:, prompt_length:]
        _, has_eos = response_mask_from_eos(response, request.sampling.eos_token_ids)
        reasons: list[FinishReason] = ["stop" if e else "length" for e in has_eos.tolist()]
        return EngineCompletions(response_ids=response, logprobs=None, finish_reasons=reasons)
