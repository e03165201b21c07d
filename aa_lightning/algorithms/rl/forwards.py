"""Training-time forwards of a rollout: token log-probs from temperature-scaled logits, critic values,
and the chunked no-grad passes (``forward_batch_size`` sequences at a time).

A family that samples its own trajectories (:mod:`aa_lightning.models.trajectories`) scores its recorded
steps itself: the same ``(N, R)`` log-probs, one per step, so every loss reads them as token log-probs."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from aa_lightning.algorithms.logprobs import entropy_from_logits, selective_log_softmax
from aa_lightning.algorithms.rl.rollout import Rollout
from aa_lightning.models.positions import computes_own_positions
from aa_lightning.models.trajectories import trajectory_family
from aa_lightning.models.unwrap import unwrap

__all__ = ["ForwardsMixin"]


class ForwardsMixin:
    """Mixed into :class:`~aa_lightning.algorithms.rl.module.OnlineRLModule` (reads ``generation``,
    ``forward_batch_size`` and ``frozen``). Positions skip the left padding unless the model computes its own
    (:func:`~aa_lightning.models.positions.computes_own_positions`)."""

    # -- forwards --------------------------------------------------------------------------------------
    def chunks(self, n: int) -> list[torch.Tensor]:
        size = self.forward_batch_size or n
        return list(torch.arange(n).split(size))

    def _supports_logits_to_keep(self, model: nn.Module) -> bool:
        target = unwrap(model)
        base = target.get_base_model() if hasattr(target, "get_base_model") else target
        try:
            return "logits_to_keep" in inspect.signature(base.forward).parameters
        except (TypeError, ValueError):
            return False

    def response_log_probs(
        self, model: nn.Module, rollout: Rollout, with_entropy: bool = False, entropy_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(log p(response token) (N, R), entropy (N, R) | None)`` from temperature-scaled logits.

        The entropy is detached unless ``entropy_grad`` (an entropy bonus needs its gradient).
        """
        family = trajectory_family(model)
        if family is not None:  # the steps of a trajectory: the family's step densities (no temperature)
            prompt = rollout.prompt_length
            steps = family.trajectory_log_probs(
                rollout.sequences[:, :prompt],
                rollout.attention_mask[:, :prompt],
                rollout.response_ids,
                rollout.trajectory,
            )
            entropy = steps.entropy if entropy_grad else steps.entropy.detach() if with_entropy else None
            return steps.log_probs, entropy
        inputs = rollout.model_inputs(not computes_own_positions(model))
        r = rollout.response_length
        kwargs: dict[str, Any] = {"use_cache": False}
        if self._supports_logits_to_keep(model):
            kwargs["logits_to_keep"] = r + 1
        logits = model(**inputs, **kwargs).logits
        logits = logits[:, -(r + 1) : -1]
        temperature = self.generation.temperature if self.generation.do_sample else 1.0
        # float32 results, the division by the temperature included (done per chunk, after the upcast)
        logprobs = selective_log_softmax(logits, rollout.response_ids, temperature=temperature)
        entropy = None
        if entropy_grad:
            entropy = entropy_from_logits(logits, temperature=temperature).float()
        elif with_entropy:
            with torch.no_grad():
                entropy = entropy_from_logits(logits.detach(), temperature=temperature).float()
        return logprobs, entropy

    def value_forward(self, critic: nn.Module, rollout: Rollout) -> torch.Tensor:
        """Critic values ``(N, R)``: the value of the state *before* each response token."""
        if rollout.trajectory:
            raise ValueError("a critic reads token sequences; a sampled trajectory has no tokens to read")
        inputs = rollout.model_inputs(not computes_own_positions(critic))
        scores = critic(**inputs).scores
        r = rollout.response_length
        return scores[:, -(r + 1) : -1].float()

    @torch.no_grad()
    def chunked(self, fn: Any, rollout: Rollout) -> Any:
        """Apply ``fn(sub_rollout)`` to chunks of ``forward_batch_size`` and concatenate the outputs."""
        outs = [fn(rollout.select(idx)) for idx in self.chunks(len(rollout))]
        if isinstance(outs[0], tuple):
            return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outs))
        return torch.cat(outs)

    def reference_response_log_probs(self, rollout: Rollout) -> torch.Tensor:
        with self.frozen.running("reference", self.model) as ref:
            return self.chunked(lambda ro: self.response_log_probs(ref, ro)[0], rollout)
