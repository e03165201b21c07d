"""PPO for RLHF (Ouyang et al. 2022, arXiv:2203.02155) with manual optimization.

Four models: the actor (``self.model``, trained), the critic (a :class:`ScoreModel`, trained), the reward
model (frozen; optional when reward functions are given) and the reference (a frozen copy of the initial
actor). One training step = one rollout:

1. sample responses for the prompt batch (:meth:`OnlineRLModule.generate_rollout`);
2. score them (reward model end score and/or reward functions), then with no grad: old log-probs (+ entropy),
   reference log-probs and values, one chunked forward per model;
3. per-token rewards: ``-kl_coef * KL_t`` (k1 or k3 estimator against the reference) plus the (optionally
   normalised / clipped) score on the last response token, minus ``missing_eos_penalty`` for responses cut
   at ``max_new_tokens``; GAE advantages over response tokens (whitened) and returns for the critic;
4. ``ppo_epochs`` passes over shuffled minibatches: clipped surrogate (+ entropy bonus), clipped value loss,
   gradient accumulation over ``gradient_accumulation_steps`` minibatches, gradient clipping; the ptx loss
   (supervised batch of the rollout's step, weight ``ptx_coef``) once per optimizer update.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from aa_lightning.algorithms.logprobs import causal_lm_log_probs, masked_mean, masked_whiten
from aa_lightning.algorithms.losses import compute_gae, kl_penalty, ppo_policy_loss, ppo_value_loss
from aa_lightning.algorithms.rl.metrics import MetricAccumulator, RunningMoments, explained_variance
from aa_lightning.algorithms.rl.module import OnlineRLModule
from aa_lightning.algorithms.rl.multi_turn import TURN_REWARDS
from aa_lightning.algorithms.rl.rollout import Rollout, rollout_mean_kl
from aa_lightning.algorithms.rl.update import MinibatchWeights
from aa_lightning.batch import LABELS, model_inputs
from aa_lightning.models.trajectories import trajectory_family

__all__ = ["PPOModule"]


class PPOModule(OnlineRLModule):
    """PPO actor-critic RLHF on prompt-only data (any modality: the batch's tensors are the model inputs).

    Args:
        critic_model_name_or_path: critic initialisation; defaults to the reward model (when it shares the
            actor's tokenizer), else the actor.
        critic_lr: critic learning rate (default: ``optim.lr``).
        critic_head_init_std: std of a NEW value head (a critic started from a checkpoint without a score
            head). 0 starts every value at 0, so early advantages are the plain (KL-shaped) returns instead of
            being drowned by random value predictions; None uses the ScoreModel default.
        kl_coef: weight of the per-token KL penalty against the reference.
        kl_estimator: ``k1`` (``log p - log p_ref``) or ``k3`` (non-negative, unbiased) per-token estimate.
        ppo_epochs: passes over each rollout.
        clip_range: PPO ratio clip ``eps``.
        clip_range_value: clip of the value update around the rollout values.
        value_loss_coef: weight of the value loss (scales the critic's gradient).
        entropy_coef: entropy bonus weight (0 = off; entropy is still logged).
        gamma: discount over response tokens.
        lam: GAE lambda.
        whiten_advantages: normalise advantages over the rollout's response tokens.
        normalize_score: divide scores by running std after subtracting the running mean (statistics over
            every score seen, kept in checkpoints).
        score_clip: clip the (normalised) score to ``[-score_clip, score_clip]``.
        loss_aggregation: policy-loss reduction: ``token_mean``, ``sequence_mean`` or ``constant`` (token sum over
            ``responses * max_policy_tokens()``: ``max_new_tokens``, times ``max_turns`` with an environment).
        ptx_coef: weight of the supervised (pre-training mix) loss on a ``ptx`` batch, when the train loader
            yields ``{"prompt": prompt_batch, "ptx": supervised_batch}`` (the datamodule's ``ptx`` data spec,
            or a dict of loaders). The rollout's ptx batch enters each optimizer update once.
        **kwargs: see :class:`OnlineRLModule` and :class:`AlignModule` (``optim`` is the actor's).
    """

    def __init__(
        self,
        *args: Any,
        critic_model_name_or_path: str | None = None,
        critic_lr: float | None = None,
        critic_head_init_std: float | None = 0.0,
        kl_coef: float = 0.05,
        kl_estimator: Literal["k1", "k3"] = "k1",
        ppo_epochs: int = 1,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        value_loss_coef: float = 1.0,
        entropy_coef: float = 0.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        normalize_score: bool = False,
        score_clip: float | None = None,
        loss_aggregation: Literal["token_mean", "sequence_mean", "constant"] = "token_mean",
        ptx_coef: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if ppo_epochs < 1:
            raise ValueError("ppo_epochs must be >= 1")
        self.critic_model_name_or_path = critic_model_name_or_path
        self.critic_lr_override = critic_lr
        self.critic_head_init_std = critic_head_init_std
        self.kl_coef = kl_coef
        self.kl_estimator = kl_estimator
        self.ppo_epochs = ppo_epochs
        self.clip_range = clip_range
        self.clip_range_value = clip_range_value
        self.value_loss_coef = value_loss_coef
        self.entropy_coef = entropy_coef
        self.gamma = gamma
        self.lam = lam
        self.whiten_advantages = whiten_advantages
        self.normalize_score = normalize_score
        self.score_clip = score_clip
        self.loss_aggregation = loss_aggregation
        self.ptx_coef = ptx_coef
        self.critic: nn.Module | None = None
        self.score_moments = RunningMoments()

    # -- models ----------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.build_actor()
        if trajectory_family(self.model) is not None:
            raise ValueError(
                f"{self.model_name_or_path!r} samples multi-step trajectories (a denoising chain): PPO's critic "
                "is a score model that predicts a value per token from the token sequence, and a trajectory "
                "has no tokens for it to read; train GRPOModule instead (with group-normalised advantages it "
                "is DDPO's clipped importance-sampling objective, no critic)"
            )
        self.build_reference()
        critic_path = self.critic_init_path(
            self.critic_model_name_or_path, self.reward_model, self.reward_tokenizer
        )
        self.critic = self.load_trainable_score_model(critic_path, self.critic_head_init_std)

    def critic_modules(self) -> list[nn.Module]:
        return [self.critic]

    def critic_lr(self) -> float:
        return self.critic_lr_override if self.critic_lr_override is not None else self.optim.lr

    def updates_per_rollout(self) -> int:
        return self.ppo_epochs * super().updates_per_rollout()

    # -- experience ------------------------------------------------------------------------------------
    def experience(self, batch: dict[str, Any]) -> tuple[Rollout, MetricAccumulator]:
        """Sample, score and evaluate one rollout; fills advantages and returns."""
        stats = MetricAccumulator()
        rollout = self.generate_rollout(batch)
        self.score_rollout(rollout, stats)
        self.forward_rollout(rollout, stats)
        self.compute_advantages(rollout, stats)
        return rollout, stats

    def score_rollout(self, rollout: Rollout, stats: MetricAccumulator) -> None:
        scores, parts = self.compute_scores(rollout)
        rollout["scores"] = scores
        self.rollout_stats(stats, rollout, scores, parts)

    @torch.no_grad()
    def forward_rollout(self, rollout: Rollout, stats: MetricAccumulator) -> None:
        """Old log-probs (+ entropy), reference log-probs and values: one chunked pass per model."""
        mask = rollout.response_mask
        old, entropy = self.chunked(
            lambda ro: self.response_log_probs(self.model, ro, with_entropy=True), rollout
        )
        rollout["old_logprobs"] = old
        self.log_sampling_gap(stats, rollout, old)
        rollout["ref_logprobs"] = self.reference_response_log_probs(rollout)
        rollout["old_values"] = self.chunked(lambda ro: self.value_forward(self.critic, ro), rollout)
        stats.add_mean("rollout/entropy", entropy, mask)
        stats.add_mean("rollout/kl", rollout_mean_kl(old, rollout["ref_logprobs"], mask))
        stats.add_mean("rollout/value", rollout["old_values"], mask)

    def shaped_score(
        self,
        scores: torch.Tensor,
        has_eos: torch.Tensor,
        moments: RunningMoments | None,
        stats: MetricAccumulator,
        name: str = "score",
        eos_penalty: bool = True,
    ) -> torch.Tensor:
        """Score as it enters the rewards: running normalisation, clipping, then the missing-EOS penalty
        (in normalised units, so the penalty keeps its configured size)."""
        out = scores
        if moments is not None:
            moments.update(self.all_gather(scores).flatten())
            out = moments.normalize(out)
            stats.add(f"rollout/{name}_running_mean", moments.mean.to(self.device), 1)
            stats.add(f"rollout/{name}_running_std", moments.std.to(self.device), 1)
        if self.score_clip is not None:
            out = out.clamp(-self.score_clip, self.score_clip)
        if eos_penalty and self.missing_eos_penalty:
            out = out - self.missing_eos_penalty * (~has_eos).to(out.dtype)
        return out

    def token_rewards(
        self, score: torch.Tensor, rollout: Rollout, kl_sign: float = -1.0, turn_rewards: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rewards (N, R), kl (N, R))``: ``kl_sign * kl_coef * KL_t`` per token + ``score`` at the last one.

        "Last" is the last policy token (a multi-turn rollout's mask has holes at environment tokens); with
        ``turn_rewards`` the environment's per-turn rewards are added on their turns' last policy tokens.
        """
        mask = rollout.response_mask
        kl = kl_penalty(rollout["old_logprobs"], rollout["ref_logprobs"], self.kl_estimator)
        kl = torch.where(mask, kl, torch.zeros_like(kl))
        rewards = kl_sign * self.kl_coef * kl
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, -1).max(dim=1).values.clamp(min=0).unsqueeze(1)
        rewards = rewards.scatter_add(1, last, score.to(rewards.dtype).unsqueeze(1))
        if turn_rewards and TURN_REWARDS in rollout.data:
            rewards = rewards + rollout[TURN_REWARDS].to(rewards.dtype)
        return rewards, kl

    def gae(
        self, rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(advantages, returns)`` of one stream, raw (not whitened: see :meth:`whiten`)."""
        return compute_gae(rewards, values, mask, self.gamma, self.lam)

    def whiten(self, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The actor's advantages, whitened over response tokens when configured (once, after any mixing)."""
        return masked_whiten(advantages, mask) if self.whiten_advantages else advantages

    @torch.no_grad()
    def compute_advantages(self, rollout: Rollout, stats: MetricAccumulator) -> None:
        rollout["advantages"] = self.whiten(self.reward_advantages(rollout, stats), rollout.response_mask)

    @torch.no_grad()
    def reward_advantages(self, rollout: Rollout, stats: MetricAccumulator) -> torch.Tensor:
        """Raw GAE advantages of the reward stream; fills ``returns`` and ``sequence_rewards``."""
        mask = rollout.response_mask
        moments = self.score_moments if self.normalize_score else None
        score = self.shaped_score(rollout["scores"], rollout.has_eos, moments, stats)
        rewards, kl = self.token_rewards(score, rollout)
        advantages, returns = self.gae(rewards, rollout["old_values"], mask)
        rollout["returns"] = returns
        rollout["sequence_rewards"] = torch.where(mask, rewards, torch.zeros_like(rewards)).sum(dim=1)
        stats.add_std("rollout/reward", rollout["sequence_rewards"])
        stats.add_mean("rollout/kl_penalty", -self.kl_coef * kl.sum(dim=1))
        stats.add_mean("rollout/return", returns, mask)
        stats.add("train/explained_variance", explained_variance(rollout["old_values"], returns, mask), 1)
        return advantages

    # -- update ----------------------------------------------------------------------------------------
    def ptx_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Token-mean NLL of a supervised batch (the InstructGPT pre-training mix); LM head on labelled rows only."""
        logps = causal_lm_log_probs(self.model, model_inputs(batch, self.model), batch[LABELS])
        return -logps.sum.sum() / logps.token_count.sum().clamp(min=1)

    def actor_loss(
        self, mb: Rollout, stats: MetricAccumulator, token_weight: torch.Tensor, seq_weight: float
    ) -> torch.Tensor:
        """Clipped surrogate (+ entropy bonus) of one minibatch, weighted for accumulation."""
        mask = mb.response_mask
        logprobs, entropy = self.response_log_probs(
            self.model, mb, with_entropy=True, entropy_grad=self.entropy_coef != 0
        )
        out = ppo_policy_loss(
            logprobs,
            mb["old_logprobs"],
            mb["advantages"],
            mask,
            self.clip_range,
            self.loss_aggregation,
            self.max_policy_tokens(),
            importance_weights=self.tis_weights(stats, mb, mb["old_logprobs"]),
        )
        weight = token_weight if self.loss_aggregation == "token_mean" else seq_weight
        loss = out.loss * weight
        if self.entropy_coef:
            loss = loss - self.entropy_coef * masked_mean(entropy, mask) * token_weight
        tokens = mask.sum()
        stats.add("train/policy_loss", out.loss.detach() * tokens, tokens)
        stats.add("train/policy_clip_fraction", out.clip_fraction * tokens, tokens)
        stats.add("train/approx_kl", out.approx_kl * tokens, tokens)
        stats.add_mean("train/entropy", entropy.detach(), mask)
        return loss

    def critic_loss(self, mb: Rollout, stats: MetricAccumulator, token_weight: torch.Tensor) -> torch.Tensor:
        return self.value_loss(self.critic, mb, "old_values", "returns", "value", stats, token_weight)

    def value_loss(
        self,
        critic: nn.Module,
        mb: Rollout,
        old_key: str,
        returns_key: str,
        name: str,
        stats: MetricAccumulator,
        token_weight: torch.Tensor,
    ) -> torch.Tensor:
        mask = mb.response_mask
        values = self.value_forward(critic, mb)
        out = ppo_value_loss(values, mb[old_key], mb[returns_key], mask, self.clip_range_value)
        tokens = mask.sum()
        stats.add(f"train/{name}_loss", out.loss.detach() * tokens, tokens)
        stats.add(f"train/{name}_clip_fraction", out.clip_fraction * tokens, tokens)
        return self.value_loss_coef * out.loss * token_weight

    def update(self, rollout: Rollout, ptx_batch: dict[str, Any] | None, stats: MetricAccumulator) -> None:
        """``ppo_epochs`` passes over the rollout's minibatch groups, one optimizer update per group.

        A ``ptx`` batch enters every optimizer update ONCE, with weight ``ptx_coef``: its loss joins the last
        minibatch of the group (one backward per minibatch, so DDP sees every trained parameter in each).
        """
        use_ptx = ptx_batch is not None and bool(self.ptx_coef)
        if ptx_batch is not None and not use_ptx:
            rank_zero_warn(
                "the train loader yields ptx batches but ptx_coef is 0: they are loaded and ignored"
            )

        def minibatch_loss(mb: Rollout, weights: MinibatchWeights) -> torch.Tensor:
            loss = self.actor_loss(mb, stats, weights.token, weights.sequence)
            if use_ptx and weights.last:
                ptx = self.ptx_loss(ptx_batch)
                stats.add("train/ptx_loss", ptx.detach(), 1)
                loss = loss + self.ptx_coef * ptx
            return loss + self.critic_loss(mb, stats, weights.token)

        self.run_updates(rollout, self.ppo_epochs, minibatch_loss, stats)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        prompt_batch, ptx_batch = self.split_batch(batch)
        rollout, stats = self.experience(prompt_batch)
        self.update(rollout, ptx_batch, stats)
        self.log_metrics(stats, rollout, {"score": rollout["scores"], "reward": rollout["sequence_rewards"]})
        self._rollout_index += 1

    # -- checkpoint state ------------------------------------------------------------------------------
    def rl_state_dict(self) -> dict[str, Any]:
        return {**super().rl_state_dict(), "score_moments": self.score_moments.state_dict()}

    def load_rl_state_dict(self, state: dict[str, Any]) -> None:
        super().load_rl_state_dict(state)
        if "score_moments" in state:
            self.score_moments.load_state_dict(state["score_moments"])
