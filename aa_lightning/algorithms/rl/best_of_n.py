"""Best-of-n / rejection-sampling fine-tuning (RAFT: Dong et al. 2023, arXiv:2304.06767).

Each rollout samples ``num_generations`` (n) responses per prompt in ONE ``generate`` call, scores them with
the reward model and/or reward functions (minus ``missing_eos_penalty`` for unfinished responses), keeps the
``top_k`` best of every prompt (ties: the earlier sample) and takes plain SFT steps on them: the token
negative log-likelihood of the kept responses (EOS included, so the policy also learns where to stop), a
token mean over the kept responses of every rank. No reference model, no ratio: the update is
supervised, only the data are chosen by reward.

The NLL uses the model's own distribution (temperature 1), as SFT does, whatever the sampling temperature.
"""

from __future__ import annotations

from typing import Any

import torch

from aa_lightning.algorithms.logprobs import selective_log_softmax
from aa_lightning.algorithms.rl.metrics import MetricAccumulator
from aa_lightning.algorithms.rl.module import OnlineRLModule
from aa_lightning.algorithms.rl.rollout import Rollout
from aa_lightning.algorithms.rl.update import MinibatchWeights
from aa_lightning.batch import PTX_STREAM
from aa_lightning.models.positions import computes_own_positions

__all__ = ["BestOfNModule", "top_k_per_group"]


def top_k_per_group(scores: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """Row indices ``(N / group_size * k,)`` of the ``k`` highest scores of each contiguous group.

    Ties go to the earlier row (a stable sort), so the choice does not depend on the device's sort.
    """
    grouped = scores.detach().view(-1, group_size)
    order = torch.sort(grouped, dim=1, descending=True, stable=True).indices[:, :k]
    base = torch.arange(grouped.shape[0], device=scores.device).unsqueeze(1) * group_size
    return (base + order).flatten()


class BestOfNModule(OnlineRLModule):
    """RAFT on prompt-only data: sample n, keep the top-k by reward, SFT on them.

    Args:
        num_generations: responses sampled per prompt (n >= 2).
        top_k: responses kept per prompt (1 <= k < n).
        sft_epochs: passes of SFT over each rollout's kept responses.
        **kwargs: see :class:`OnlineRLModule` and :class:`AlignModule`.

    Logs ``rollout/score`` (all samples), ``rollout/kept_score``, ``rollout/best_minus_mean`` (how much the
    selection buys), ``train/loss`` (NLL per kept token) and the rollout statistics of the base module.
    """

    def __init__(
        self,
        *args: Any,
        num_generations: int = 4,
        top_k: int = 1,
        sft_epochs: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if num_generations < 2 or not 1 <= top_k < num_generations:
            raise ValueError(
                f"best-of-n needs num_generations >= 2 and 1 <= top_k < num_generations "
                f"(got num_generations={num_generations}, top_k={top_k})"
            )
        if sft_epochs < 1:
            raise ValueError("sft_epochs must be >= 1")
        self.num_generations = num_generations
        self.top_k = top_k
        self.sft_epochs = sft_epochs

    def configure_model(self) -> None:
        if self.model is None:
            self.build_actor()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule_args = getattr(self.trainer.datamodule, "hparams", None) or {}
        if datamodule_args.get(PTX_STREAM):
            raise ValueError("best-of-n has no ptx loss: remove the ptx data stream (data.ptx)")

    def updates_per_rollout(self) -> int:
        return self.sft_epochs * super().updates_per_rollout()

    @torch.no_grad()
    def experience(self, batch: dict[str, Any]) -> tuple[Rollout, MetricAccumulator]:
        """Sample n per prompt, score, keep the top-k of each prompt."""
        stats = MetricAccumulator()
        rollout = self.generate_rollout(batch, num_samples=self.num_generations)
        scores, parts = self.compute_scores(rollout)
        self.rollout_stats(stats, rollout, scores, parts)
        ranked = scores + self.turn_reward_sums(rollout)  # multi-turn: the environment's per-turn rewards too
        if self.missing_eos_penalty:
            ranked = ranked - self.missing_eos_penalty * (~rollout.has_eos).to(ranked.dtype)
        keep = top_k_per_group(ranked, self.num_generations, self.top_k)
        kept = rollout.select(keep.cpu())
        kept["scores"] = ranked[keep]
        stats.add_mean("rollout/kept_score", kept["scores"])
        stats.add_mean(
            "rollout/best_minus_mean",
            ranked.view(-1, self.num_generations).max(dim=1).values
            - ranked.view(-1, self.num_generations).mean(dim=1),
        )
        stats.add_mean("rollout/kept_response_length", kept.response_mask.sum(dim=1).float())
        return kept, stats

    def token_nll(self, rollout: Rollout) -> torch.Tensor:
        """``(N, R)`` negative log-likelihood of each response token (temperature 1, as in SFT)."""
        inputs = rollout.model_inputs(not computes_own_positions(self.model))
        r = rollout.response_length
        kwargs: dict[str, Any] = {"use_cache": False}
        if self._supports_logits_to_keep(self.model):
            kwargs["logits_to_keep"] = r + 1
        logits = self.model(**inputs, **kwargs).logits[:, -(r + 1) : -1]
        return -selective_log_softmax(logits, rollout.response_ids)

    def update(self, kept: Rollout, stats: MetricAccumulator) -> None:
        """``sft_epochs`` passes of token-mean NLL over the kept responses (the shared minibatch loop)."""

        def minibatch_loss(mb: Rollout, weights: MinibatchWeights) -> torch.Tensor:
            mask = mb.response_mask
            nll = self.token_nll(mb)
            tokens = mask.sum().clamp(min=1)
            loss = torch.where(mask, nll, torch.zeros_like(nll)).sum() / tokens
            stats.add_mean("train/loss", nll.detach(), mask)
            return loss * weights.token

        self.run_updates(kept, self.sft_epochs, minibatch_loss, stats)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        prompt_batch, ptx_batch = self.split_batch(batch)
        if ptx_batch is not None:
            raise ValueError("best-of-n has no ptx loss: remove the ptx data stream (data.ptx)")
        kept, stats = self.experience(prompt_batch)
        self.update(kept, stats)
        self.log_metrics(stats, kept, {"score": kept["scores"]})
        self._rollout_index += 1
