"""GRPO: group-relative policy optimisation (Shao et al. 2024, arXiv:2402.03300), no critic.

Each prompt is repeated ``num_generations`` (G) times and sampled in ONE ``generate`` call; the G scores of a
prompt are normalised inside their group (``scale: std``: ``(r - mean) / (std + eps)``; ``scale: none``:
``r - mean``, the Dr. GRPO variant, arXiv:2503.20783, which does not up-weight easy/hard prompts with tiny
std). Every token of a response gets its sequence's advantage.

Loss per token: ``-min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A) + beta * k3(pi, pi_ref)``, reduced by
``loss_aggregation``:

* ``token_mean`` - every response token of the optimizer step weighs the same (DAPO): long responses
  are not down-weighted per token;
* ``sequence_mean`` - mean over tokens per response, then over responses (the original GRPO);
* ``constant`` - token sum divided by ``responses * max_new_tokens`` (Dr. GRPO): no length normalisation,
  so there is no incentive to lengthen wrong answers. Multi-turn (an ``environment``): ``max_turns *
  max_new_tokens``, the most policy tokens an episode holds (:meth:`~.module.OnlineRLModule.max_policy_tokens`).

With gradient accumulation the weights are taken over the whole accumulation group (tokens or responses
of all its minibatches), so splitting a step into minibatches does not change the objective.

DAPO (Yu et al. 2025, arXiv:2503.14476): clip-higher is ``clip_range_high``, the token-level loss is
``token_mean``; ``dynamic_sampling`` drops the groups whose G rewards are all equal and refills the step
from the next prompt batches (:mod:`.dynamic_sampling`: one Lightning batch is one generation round, the
update runs in the round that completes the step); ``overlong_buffer_length`` adds the soft overlong penalty
(:func:`~aa_lightning.algorithms.losses.overlong_penalty`) to every reward.

Options (``advantage_estimator``, ``policy_loss``; :mod:`.estimators`): RLOO, REINFORCE++ (+ group
baseline) and ReMax replace the group-normalised advantage; GSPO's sequence-level ratio and CISPO's clipped
stop-gradient weights replace the token-level clipped surrogate; ``bnpo`` aggregation weighs every
minibatch equally (token mean within it). The defaults (``grpo``, ``clip``, ``token_mean``) are GRPO as above.

``beta == 0`` loads no reference model at all. With ``num_iterations > 1`` (or several minibatches per
rollout) the rollout's log-probs are kept as ``old_logprobs`` for the ratio; a single on-policy update uses
the current log-probs detached (ratio 1, no extra forward).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from aa_lightning.algorithms.losses import grpo_loss, overlong_penalty
from aa_lightning.algorithms.rl.dynamic_sampling import DynamicSamplingMixin
from aa_lightning.algorithms.rl.estimators import AdvantageEstimatorMixin, check_estimator_options
from aa_lightning.algorithms.rl.metrics import MetricAccumulator
from aa_lightning.algorithms.rl.module import OnlineRLModule
from aa_lightning.algorithms.rl.multi_turn import TURN_REWARDS
from aa_lightning.algorithms.rl.rollout import Rollout
from aa_lightning.algorithms.rl.update import MinibatchWeights
from aa_lightning.batch import PTX_STREAM

__all__ = ["GRPOModule"]


class GRPOModule(DynamicSamplingMixin, AdvantageEstimatorMixin, OnlineRLModule):
    """GRPO on prompt-only data with pluggable rewards (reward functions and/or a reward model).

    Args:
        num_generations: responses sampled per prompt (G >= 2; 1 is enough for ``reinforce_pp`` / ``remax``).
        beta: weight of the k3 KL to the reference (0: no reference model is loaded).
        clip_range: lower ratio clip ``eps``.
        clip_range_high: upper ratio clip (DAPO clip-higher); defaults to ``clip_range``.
        scale: ``std`` (GRPO) or ``none`` (mean-only, Dr. GRPO); ``advantage_estimator: grpo`` only.
        loss_aggregation: ``token_mean`` | ``sequence_mean`` | ``constant`` | ``bnpo`` (module docstring).
        num_iterations: optimisation passes over each rollout (``mu`` in the paper).
        dynamic_sampling: DAPO's dynamic sampling: drop groups whose rewards are all equal, refill from the
            next prompt batches (one generation round per data batch) until ``dynamic_sampling_groups`` groups.
        dynamic_sampling_groups: groups per rank each update trains on (None: the prompts of one data batch;
            at most that many).
        max_generation_rounds: cap on the rounds of one update; when hit, the update trains on what was
            collected (topped up with zero-advantage groups, logged as ``filler_fraction`` and ``capped``).
        overlong_buffer_length: ``L_cache`` of DAPO's overlong penalty (None: off).
        overlong_max_length: ``L_max`` of it (None: ``generation.max_new_tokens``).
        overlong_penalty_factor: scale of the overlong penalty.
        advantage_estimator: ``grpo`` | ``rloo`` | ``reinforce_pp`` | ``reinforce_pp_baseline`` | ``remax``
            (:mod:`.estimators`).
        policy_loss: ``clip`` (PPO/GRPO token ratio) | ``gspo`` (sequence ratio, arXiv:2507.18071) |
            ``cispo`` (clipped stop-gradient weight, arXiv:2506.13585).
        **kwargs: see :class:`OnlineRLModule` and :class:`AlignModule`.
    """

    def __init__(
        self,
        *args: Any,
        num_generations: int = 4,
        beta: float = 0.04,
        clip_range: float = 0.2,
        clip_range_high: float | None = None,
        scale: Literal["std", "none"] = "std",
        loss_aggregation: Literal["token_mean", "sequence_mean", "constant", "bnpo"] = "token_mean",
        num_iterations: int = 1,
        dynamic_sampling: bool = False,
        dynamic_sampling_groups: int | None = None,
        max_generation_rounds: int = 4,
        overlong_buffer_length: int | None = None,
        overlong_max_length: int | None = None,
        overlong_penalty_factor: float = 1.0,
        advantage_estimator: Literal[
            "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax"
        ] = "grpo",
        policy_loss: Literal["clip", "gspo", "cispo"] = "clip",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_estimator_options(advantage_estimator, policy_loss, num_generations, scale)
        if num_iterations < 1:
            raise ValueError("num_iterations must be >= 1")
        self.num_generations = num_generations
        self.beta = beta
        self.clip_range = clip_range
        self.clip_range_high = clip_range_high
        self.scale = scale
        self.loss_aggregation = loss_aggregation
        self.num_iterations = num_iterations
        if max_generation_rounds < 1 or (dynamic_sampling_groups is not None and dynamic_sampling_groups < 1):
            raise ValueError("max_generation_rounds and dynamic_sampling_groups must be >= 1")
        self.dynamic_sampling = dynamic_sampling
        self.dynamic_sampling_groups = dynamic_sampling_groups
        self.max_generation_rounds = max_generation_rounds
        self.overlong_buffer_length = overlong_buffer_length
        if (
            overlong_buffer_length is not None
            and self.environment is not None
            and overlong_max_length is None
        ):
            raise ValueError(
                "overlong_buffer_length with an environment: the penalty counts the policy tokens of all turns of "
                "an episode, so its default L_max (generation.max_new_tokens, one turn) does not fit; set "
                "overlong_max_length"
            )
        self.overlong_max_length = overlong_max_length or self.generation.max_new_tokens
        self.overlong_penalty_factor = overlong_penalty_factor
        if overlong_buffer_length is not None and not 0 < overlong_buffer_length <= self.overlong_max_length:
            raise ValueError(
                f"need 0 < overlong_buffer_length ({overlong_buffer_length}) <= overlong_max_length "
                f"({self.overlong_max_length}, default generation.max_new_tokens)"
            )
        if dynamic_sampling and advantage_estimator not in ("grpo", "rloo"):
            raise ValueError(
                f"dynamic_sampling filters groups by their advantages, which {advantage_estimator!r} computes "
                "from more than the group (the batch, the log-probs or a greedy rollout): use grpo or rloo"
            )
        self.advantage_estimator = advantage_estimator
        self.policy_loss = policy_loss

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.build_actor()
        if self.beta != 0:
            self.build_reference()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule_args = getattr(self.trainer.datamodule, "hparams", None) or {}
        if datamodule_args.get(PTX_STREAM):  # refused before any rollout, not at the first ptx batch
            raise ValueError("GRPO has no ptx loss: remove the ptx data stream (data.ptx) or train PPO")

    def updates_per_rollout(self) -> int:
        return self.num_iterations * super().updates_per_rollout()

    def needs_old_logprobs(self) -> bool:
        return self.updates_per_rollout() > 1 or self.kl_in_reward()

    def shaped_rewards(self, rollout: Rollout, scores: torch.Tensor) -> torch.Tensor:
        """The scores the advantages are computed from (``missing_eos_penalty`` applied)."""
        if self.missing_eos_penalty:
            return scores - self.missing_eos_penalty * (~rollout.has_eos).to(scores.dtype)
        return scores

    @torch.no_grad()
    def experience(self, batch: dict[str, Any]) -> tuple[Rollout, MetricAccumulator]:
        rollout, stats = self.sample_and_score(batch)
        self.add_logprobs(rollout, stats)
        # after the log-probs: REINFORCE++ folds their KL into the reward
        rollout["advantages"] = self.estimate_advantages(batch, rollout, rollout["rewards"], stats)
        return rollout, stats

    @torch.no_grad()
    def sample_and_score(self, batch: dict[str, Any]) -> tuple[Rollout, MetricAccumulator]:
        """Generate G responses per prompt, score them, shape the rewards, compute the advantages."""
        stats = MetricAccumulator()
        rollout = self.generate_rollout(batch, num_samples=self.num_generations)
        scores, parts = self.compute_scores(rollout)
        rollout["scores"] = scores
        self.rollout_stats(stats, rollout, scores, parts)
        rewards = self.shaped_rewards(rollout, scores)
        if TURN_REWARDS in rollout.data:  # a multi-turn rollout: the environment's per-turn rewards join
            rewards = rewards + self.turn_reward_sums(rollout).to(rewards.dtype)
        if self.overlong_buffer_length is not None:
            penalty = overlong_penalty(
                rollout.response_mask.sum(dim=1),
                self.overlong_max_length,
                self.overlong_buffer_length,
                self.overlong_penalty_factor,
            )
            stats.add_mean("rollout/overlong_penalty", penalty)
            rewards = rewards + penalty.to(rewards.dtype)
        rollout["rewards"] = rewards
        if self.dynamic_sampling:  # the group filter and merged rounds need them now (group-local estimators)
            rollout["advantages"] = self.estimate_advantages(batch, rollout, rewards, stats)
        if self.num_generations > 1:
            grouped = rewards.float().view(-1, self.num_generations)
            group_std = grouped.std(dim=1, correction=1)
            stats.add_mean("rollout/group_reward_std", group_std)
            stats.add_mean("rollout/zero_std_group_fraction", (group_std < 1e-6).float())
        return rollout, stats

    @torch.no_grad()
    def add_logprobs(self, rollout: Rollout, stats: MetricAccumulator) -> None:
        """The rollout-time log-probs the update needs (policy when off-policy passes follow, reference)."""
        if self.needs_old_logprobs():
            old, entropy = self.chunked(
                lambda ro: self.response_log_probs(self.model, ro, with_entropy=True), rollout
            )
            rollout["old_logprobs"] = old
            stats.add_mean("rollout/entropy", entropy, rollout.response_mask)
            self.log_sampling_gap(stats, rollout, old)
        if self.beta != 0:
            rollout["ref_logprobs"] = self.reference_response_log_probs(rollout)

    def update(self, rollout: Rollout, stats: MetricAccumulator) -> None:
        """``num_iterations`` passes over the rollout's minibatch groups (the shared loop of :mod:`.update`)."""

        def minibatch_loss(mb: Rollout, weights: MinibatchWeights) -> torch.Tensor:
            mask = mb.response_mask
            logprobs, entropy = self.response_log_probs(self.model, mb, with_entropy=True)
            old = mb.data.get("old_logprobs")
            if old is None:  # one on-policy pass: the current log-probs are the rollout-time ones
                self.log_sampling_gap(stats, mb, logprobs)
            importance = self.tis_weights(stats, mb, logprobs if old is None else old)
            out = grpo_loss(
                logprobs,
                mb.data.get("old_logprobs"),
                None if self.kl_in_reward() else mb.data.get("ref_logprobs"),  # REINFORCE++: KL in the reward
                mb["advantages"],
                mask,
                clip_range=self.clip_range,
                beta=self.beta,
                aggregation=self.loss_aggregation,
                max_completion_length=self.max_policy_tokens(),
                clip_range_high=self.clip_range_high,
                policy_loss=self.policy_loss,
                importance_weights=importance,
            )
            tokens = mask.sum()
            stats.add("train/loss", out.loss.detach() * tokens, tokens)
            stats.add("train/clip_fraction", out.clip_fraction * tokens, tokens)
            stats.add("train/kl", out.kl * tokens, tokens)
            stats.add_mean("train/entropy", entropy, mask)
            if self.loss_aggregation == "bnpo":  # a token mean per minibatch, every minibatch weighs the same
                return out.loss * weights.minibatch
            return out.loss * (weights.token if self.loss_aggregation == "token_mean" else weights.sequence)

        self.run_updates(rollout, self.num_iterations, minibatch_loss, stats)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        prompt_batch, ptx_batch = self.split_batch(batch)
        if ptx_batch is not None:
            raise ValueError("GRPO has no ptx loss: remove the ptx data stream (data.ptx) or train PPO")
        if self.dynamic_sampling:
            collected = self.dynamic_sampling_round(prompt_batch)
            if collected is None:  # the step is not complete: the next batch is another round
                self._rollout_index += 1
                return
            rollout, stats = collected
        else:
            rollout, stats = self.experience(prompt_batch)
        self.update(rollout, stats)
        advantages = self.sequence_advantages(rollout["advantages"], rollout.response_mask)
        self.log_metrics(stats, rollout, {"score": rollout["scores"], "advantage": advantages})
        self._rollout_index += 1

    # -- checkpoint state ------------------------------------------------------------------------------
    def rl_state_dict(self) -> dict[str, Any]:
        state = super().rl_state_dict()
        if self.dynamic_sampling:  # every rank's partly collected step (a collective with several processes)
            state["dynamic_sampling"] = self.dynamic_sampling_state()
        return state

    def load_rl_state_dict(self, state: dict[str, Any]) -> None:
        super().load_rl_state_dict(state)
        if self.dynamic_sampling and "dynamic_sampling" in state:
            self.load_dynamic_sampling_state(state["dynamic_sampling"])
