"""Scoring of a rollout: a frozen score model's end score and/or registered functions, summed with weights.

Rewards (every RL module) and Safe-RLHF's costs are the same computation over a different frozen model and
function set, so both go through :meth:`ScoringMixin.weighted_scores`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from aa_lightning.algorithms.rl.multi_turn import TURN_REWARDS
from aa_lightning.algorithms.rl.rollout import Rollout
from aa_lightning.models.positions import computes_own_positions
from aa_lightning.rewards import WeightedRewards

__all__ = ["ScoringMixin"]


class ScoringMixin:
    """Mixed into :class:`~aa_lightning.algorithms.rl.module.OnlineRLModule` (reads ``reward_model_weight``,
    ``reward_fns``, the frozen ``reward`` role and the chunked forwards)."""

    # -- scoring ---------------------------------------------------------------------------------------
    def _same_tokenizer(self, tokenizer: Any) -> bool:
        if tokenizer is None or tokenizer is self.tokenizer:
            return True
        cache = self.__dict__.setdefault("_same_tokenizer_cache", {})
        key = id(tokenizer)
        if key not in cache:
            cache[key] = tokenizer.get_vocab() == self.tokenizer.get_vocab()
        return cache[key]

    @torch.no_grad()
    def score_with_model(self, model: nn.Module, tokenizer: Any, rollout: Rollout) -> torch.Tensor:
        """End scores ``(N,)`` of prompt + response under a frozen score model.

        Same vocabulary as the actor: the token ids (and media inputs) go straight in. A different
        tokenizer gets the decoded text re-tokenized (text only).
        """
        use_pos = not computes_own_positions(model)
        if self._same_tokenizer(tokenizer):
            return self.chunked(lambda ro: model(**ro.model_inputs(use_pos)).end_scores.float(), rollout)
        texts = [
            self.tokenizer.decode(seq[mask.bool()], skip_special_tokens=False)
            for seq, mask in zip(rollout.sequences, rollout.attention_mask)
        ]
        scores = []
        for idx in self.chunks(len(rollout)):
            enc = tokenizer(
                [texts[i] for i in idx.tolist()], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
            scores.append(model(**enc).end_scores.float())
        return torch.cat(scores)

    def weighted_scores(
        self,
        rollout: Rollout,
        model: nn.Module | None,
        tokenizer: Any,
        model_weight: float,
        functions: WeightedRewards,
        model_part: str,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total (N,), parts)``: ``model_weight`` times ``model``'s end score (part ``model_part``) plus the
        weighted ``functions`` (one part each)."""
        total = torch.zeros(len(rollout), device=self.device)
        parts: dict[str, torch.Tensor] = {}
        if model is not None:
            end_scores = self.score_with_model(model, tokenizer, rollout)
            parts[model_part] = end_scores
            total = total + model_weight * end_scores
        if len(functions):
            fn_total, fn_parts = functions(rollout.prompts, rollout.responses, rollout.metas)
            total = total + fn_total.to(self.device)
            parts.update({k: v.to(self.device) for k, v in fn_parts.items()})
        return total, parts

    def turn_reward_sums(self, rollout: Rollout) -> torch.Tensor:
        """``(N,)`` the environment's per-turn rewards of each episode, summed (0 for single-turn rollouts)."""
        turn_rewards = rollout.data.get(TURN_REWARDS)
        if turn_rewards is None:
            return torch.zeros(len(rollout), device=self.device)
        return turn_rewards.sum(dim=1).to(self.device)

    def compute_scores(self, rollout: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of the reward model's end score and the reward functions: ``(total (N,), parts)``."""
        return self.weighted_scores(
            rollout,
            self.reward_model,
            self.reward_tokenizer,
            self.reward_model_weight,
            self.reward_fns,
            "reward_model",
        )
