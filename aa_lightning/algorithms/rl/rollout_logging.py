"""Rollout metrics and samples of the RL modules: sums and counts reduced in one collective per rollout, and
every ``sample_log_interval`` rollouts a markdown table of samples (multi-turn episodes: every turn with its
role), handed to callbacks' ``on_rollout_samples`` so each sample's media is logged next to its own text."""

from __future__ import annotations

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from aa_lightning.algorithms.rl.metrics import MetricAccumulator, samples_markdown
from aa_lightning.algorithms.rl.multi_turn import TURN_REWARDS, turns_markdown
from aa_lightning.algorithms.rl.rollout import Rollout
from aa_lightning.environments import CONVERSATION

__all__ = ["RolloutLoggingMixin"]


class RolloutLoggingMixin:
    """``log_metrics`` / ``log_samples`` / ``rollout_stats`` of :class:`~.module.OnlineRLModule`."""

    sample_log_interval: int
    num_logged_samples: int
    _rollout_index: int

    def log_metrics(
        self,
        stats: MetricAccumulator,
        rollout: Rollout | None = None,
        columns: dict[str, torch.Tensor] | None = None,
    ) -> None:
        metrics = stats.compute(self.reduce_sum)
        self.log_dict(
            metrics,
            on_step=True,
            on_epoch=False,
            prog_bar=False,
            sync_dist=False,
            batch_size=len(rollout) if rollout is not None else None,
        )
        interval = self.sample_log_interval
        if rollout is not None and interval and self._rollout_index % interval == 0:
            self.log_samples(rollout, columns or {})

    def log_samples(self, rollout: Rollout, columns: dict[str, torch.Tensor]) -> None:
        if not self.trainer.is_global_zero:
            return
        n = min(self.num_logged_samples, len(rollout))
        table = samples_markdown(
            rollout.prompts[:n], rollout.responses[:n], {k: v[:n].tolist() for k, v in columns.items()}
        )
        loggers = [lg for lg in self.trainer.loggers if isinstance(lg, TensorBoardLogger)]
        multi_turn = any(CONVERSATION in m for m in rollout.metas[:n])
        for logger in loggers:
            logger.experiment.add_text("rollout/samples", table, self.trainer.global_step)
            if multi_turn:  # every turn of the logged episodes with its role
                logger.experiment.add_text(
                    "rollout/turns", turns_markdown(rollout.metas[:n]), self.trainer.global_step
                )
        samples = [
            {
                "prompt": rollout.prompts[i],
                "response": rollout.responses[i],
                "scores": {k: float(v[i]) for k, v in columns.items()},
                "meta": rollout.metas[i],
                "text": samples_markdown(
                    [rollout.prompts[i]],
                    [rollout.responses[i]],
                    {k: [float(v[i])] for k, v in columns.items()},
                ),
            }
            for i in range(n)
        ]
        # the documented hook: callbacks that define ``on_rollout_samples(trainer, pl_module, samples)`` get the
        # logged samples with their metas (e.g. RolloutMediaLogger writes the media next to each text); the
        # algorithm neither imports them nor names a modality
        for callback in self.trainer.callbacks:
            hook = getattr(callback, "on_rollout_samples", None)
            if callable(hook):
                hook(self.trainer, self, samples)

    def rollout_stats(
        self, stats: MetricAccumulator, rollout: Rollout, scores: torch.Tensor, parts: dict[str, torch.Tensor]
    ) -> None:
        """Score, per-term scores, response length and EOS share of a rollout."""
        stats.add_std("rollout/score", scores)
        for name, values in parts.items():
            stats.add_mean(f"rollout/score/{name}", values)
        stats.add_mean("rollout/response_length", rollout.response_mask.sum(dim=1).float())
        stats.add_mean("rollout/eos_fraction", rollout.has_eos.float())
        if TURN_REWARDS in rollout.data:  # a multi-turn rollout
            stats.add_mean("rollout/policy_turns", rollout["policy_turns"])
            stats.add_mean("rollout/tool_call_rate", (rollout["tool_calls"] > 0).float())
            stats.add_mean("rollout/tool_calls", rollout["tool_calls"])
            stats.add_mean("rollout/turn_reward", rollout[TURN_REWARDS].sum(dim=1))
            stats.add_mean("rollout/observation_overflow", rollout["observation_overflow"])
            stats.add_mean("rollout/transcript_cut", rollout["transcript_cut"])
            env_tokens = (
                rollout.attention_mask[:, rollout.prompt_length :].bool() & ~rollout.response_mask
            ).sum(1)
            stats.add_mean("rollout/environment_tokens", env_tokens.float())
