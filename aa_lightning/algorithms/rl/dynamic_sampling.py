"""DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476, section 3.2) for the group-based RL modules.

A group whose G rewards are all equal has zero advantage everywhere: it adds no policy gradient, only dilutes
the step's token normalisation. Such groups are dropped and the batch is refilled from the next prompts until
``target`` groups (per rank) are collected, or ``max_rounds`` generation rounds were spent on the step.

Design (why one Lightning batch is one *round*): the prompt loader stays Lightning's. Each ``training_step``
generates and scores ONE prompt batch and files its varied groups into a buffer; the optimizer update runs
only in the round that completes the buffer. Nothing pulls batches behind the fit loop's back, so

* the loader position Lightning checkpoints (batches processed) is exactly where the next round starts,
  and ``max_steps`` still counts optimizer updates (``global_step`` only moves on updates);
* under DDP / ZeRO every rank runs the same rounds in lockstep: each refills from its OWN shard of prompts,
  and one all-reduce per round ("is any rank still short?") makes every rank update in the same round, so
  all ranks do the same number of generate calls (ZeRO-3 generation is ``synced_gpus``), forwards,
  backwards and optimizer steps;
* every rank trains on exactly ``target`` groups in every update (surplus groups are dropped, so the update
  stays on-policy: a surplus group kept for the next step would be one update stale). When the round cap is
  hit first, a rank that is short tops up with zero-advantage groups of its last round: they add no policy
  gradient (only the KL term and their tokens to the normalisation), and ranks keep identical sequence
  counts, hence identical chunked forwards. ``rollout/dynamic_sampling/filler_fraction`` logs how many.

The buffer (kept groups, round counters, the step's rollout statistics) is part of the checkpoint, one entry
per rank (gathered at save time, each rank takes its own back), so a run resumed from a checkpoint taken
between two rounds of a step continues exactly like the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
import torch.distributed as dist

from aa_lightning.algorithms.rl.metrics import MetricAccumulator
from aa_lightning.algorithms.rl.rollout import Rollout

__all__ = [
    "DynamicSamplingMixin",
    "DynamicSamplingBuffer",
    "concat_rollouts",
    "group_rows",
    "rollout_from_state",
    "rollout_to_state",
    "varied_groups",
]


def varied_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(N / G,)`` bool: True where a group's ``G`` rewards are not all equal (its advantages are not all 0)."""
    grouped = rewards.reshape(-1, group_size)
    return (grouped != grouped[:, :1]).any(dim=1)


def group_rows(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Row indices (sequences) of the group indices ``groups``, groups kept contiguous."""
    groups = groups.to(torch.long).flatten()
    return (groups[:, None] * group_size + torch.arange(group_size, device=groups.device)).flatten()


def _pad_columns(t: torch.Tensor, left: int, right: int, value: float | bool) -> torch.Tensor:
    if not left and not right:
        return t
    parts = []
    if left:
        parts.append(t.new_full((t.shape[0], left, *t.shape[2:]), value))
    parts.append(t)
    if right:
        parts.append(t.new_full((t.shape[0], right, *t.shape[2:]), value))
    return torch.cat(parts, dim=1)


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """One rollout of ``parts`` (rows in order), re-padded to the longest prompt and the longest response.

    Prompts are left-padded, responses right-padded (attention 0, response mask False, 0 in per-token data), so
    every row keeps its tokens at the same distance from the prompt/response boundary and the positions the
    forwards compute from the attention mask are unchanged. Extra inputs: those with one row per sequence are
    concatenated (per-token ones padded like the sequences), those with media rows are concatenated with their
    rows; anything else is refused by name.
    """
    if len(parts) == 1:
        return parts[0]
    prompt_len = max(p.prompt_length for p in parts)
    resp_len = max(p.response_length for p in parts)
    seqs, attn, resp, eos, extras, rows, data = [], [], [], [], [], [], []
    for p in parts:
        left, right = prompt_len - p.prompt_length, resp_len - p.response_length
        seqs.append(_pad_columns(p.sequences, left, right, pad_token_id))
        attn.append(_pad_columns(p.attention_mask, left, right, 0))
        resp.append(_pad_columns(p.response_mask, 0, right, False))
        eos.append(p.has_eos)
        full = p.sequences.shape[1]
        extra: dict[str, torch.Tensor] = {}
        for key, value in p.extra_inputs.items():
            if key in p.media_rows or value.dim() == 0:
                extra[key] = value
            elif value.shape[0] == len(p) and value.dim() >= 2 and value.shape[1] == full:
                extra[key] = _pad_columns(value, left, right, 0)
            elif value.shape[0] == len(p):
                extra[key] = value
            else:
                raise ValueError(
                    f"dynamic sampling cannot merge model input {key!r} of shape {tuple(value.shape)} across "
                    f"generation rounds: its rows are not one per sequence and batch['media_rows'] does not "
                    f"say whose they are"
                )
        extras.append(extra)
        rows.append(p.media_rows)
        data.append({k: _pad_columns(v, 0, right, 0) if v.dim() >= 2 else v for k, v in p.data.items()})
    keys = set(extras[0])
    if any(set(e) != keys for e in extras) or any(set(d) != set(data[0]) for d in data):
        raise ValueError("dynamic sampling: generation rounds produced rollouts with different inputs")
    merged: dict[str, torch.Tensor] = {}
    for key in keys:
        if extras[0][key].dim() == 0:
            merged[key] = extras[0][key]
        else:
            merged[key] = torch.cat([e[key] for e in extras])
    media_keys = set().union(*rows)
    media_rows = {
        key: torch.cat(
            [
                r[key] if key in r else torch.zeros(len(p), dtype=torch.long, device=p.sequences.device)
                for r, p in zip(rows, parts)
            ]
        )
        for key in media_keys
    }
    return Rollout(
        sequences=torch.cat(seqs),
        attention_mask=torch.cat(attn),
        response_mask=torch.cat(resp),
        has_eos=torch.cat(eos),
        prompt_length=prompt_len,
        extra_inputs=merged,
        media_rows=media_rows,
        prompts=[s for p in parts for s in p.prompts],
        responses=[s for p in parts for s in p.responses],
        metas=[m for p in parts for m in p.metas],
        data={k: torch.cat([d[k] for d in data]) for k in data[0]},
    )


def _to(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def rollout_to_state(rollout: Rollout) -> dict[str, Any]:
    """Plain types only (tensors on CPU, lists, dicts): loadable with ``torch.load(weights_only=True)``."""
    return {f.name: _to(getattr(rollout, f.name), "cpu") for f in dataclasses.fields(Rollout)}


def rollout_from_state(state: dict[str, Any], device: torch.device | str = "cpu") -> Rollout:
    return Rollout(**{k: _to(v, device) for k, v in state.items()})


def merge_stats(into: MetricAccumulator, other: MetricAccumulator) -> None:
    """Add ``other``'s sums, counts and squares to ``into`` (one step's statistics over several rounds)."""
    for name, total in other.sums.items():
        into.add(name, total, other.counts[name])
    for name, square in other.squares.items():
        into.squares[name] = into.squares[name] + square if name in into.squares else square.double()


@dataclasses.dataclass
class DynamicSamplingBuffer:
    """What one optimizer step has collected so far on this rank (reset after each update)."""

    kept: list[Rollout] = dataclasses.field(default_factory=list)
    rounds: int = 0
    groups_generated: int = 0
    groups_dropped: int = 0
    stats: MetricAccumulator = dataclasses.field(default_factory=MetricAccumulator)

    def kept_groups(self, group_size: int) -> int:
        return sum(len(r) for r in self.kept) // group_size

    def to(self, device: torch.device) -> None:
        self.kept = [
            r if r.sequences.device == device else rollout_from_state(vars(r), device) for r in self.kept
        ]
        for table in (self.stats.sums, self.stats.counts, self.stats.squares):
            for k, v in table.items():
                table[k] = v.to(device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kept": [rollout_to_state(r) for r in self.kept],
            "rounds": self.rounds,
            "groups_generated": self.groups_generated,
            "groups_dropped": self.groups_dropped,
            "stats": {
                "sums": _to(self.stats.sums, "cpu"),
                "counts": _to(self.stats.counts, "cpu"),
                "squares": _to(self.stats.squares, "cpu"),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept = [rollout_from_state(r) for r in state["kept"]]
        self.rounds = int(state["rounds"])
        self.groups_generated = int(state["groups_generated"])
        self.groups_dropped = int(state["groups_dropped"])
        self.stats = MetricAccumulator()
        self.stats.sums = dict(state["stats"]["sums"])
        self.stats.counts = dict(state["stats"]["counts"])
        self.stats.squares = dict(state["stats"]["squares"])


def gather_rank_states(state: dict[str, Any], world_size: int) -> list[dict[str, Any]]:
    """Every rank's ``state``, in rank order (a collective: every rank calls it, as at checkpoint saving)."""
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [state]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, state)
    return gathered


def own_rank_state(states: list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any] | None:
    """This rank's entry of a checkpoint's per-rank buffers (None, with a warning, when the world size changed)."""
    if len(states) != world_size:
        warnings.warn(
            f"the checkpoint holds dynamic-sampling buffers of {len(states)} rank(s), this run has {world_size}: "
            "the partly collected step is discarded (the resumed run is not the uninterrupted one)",
            stacklevel=2,
        )
        return None
    return states[rank]


class DynamicSamplingMixin:
    """Mixed into a group-based RL module (GRPO). Reads ``num_generations``, ``dynamic_sampling_groups`` and
    ``max_generation_rounds``; the module supplies ``sample_and_score(batch)`` (rollout with ``rewards`` and
    ``advantages``, its statistics) and ``add_logprobs(rollout, stats)`` (the forwards the update needs)."""

    num_generations: int
    dynamic_sampling_groups: int | None
    max_generation_rounds: int

    def dynamic_sampling_buffer(self) -> DynamicSamplingBuffer:
        if "_ds_buffer" not in self.__dict__:
            self.__dict__["_ds_buffer"] = DynamicSamplingBuffer()
        return self.__dict__["_ds_buffer"]

    @torch.no_grad()
    def dynamic_sampling_round(self, batch: dict[str, Any]) -> tuple[Rollout, MetricAccumulator] | None:
        """One generation round; ``(rollout, stats)`` to update on when the step is complete, else None."""
        buffer = self.dynamic_sampling_buffer()
        buffer.to(self.device)
        rollout, stats = self.sample_and_score(batch)
        size = self.num_generations
        varied = varied_groups(rollout["rewards"], size)
        groups = int(varied.numel())
        target = self.dynamic_sampling_groups or groups
        if target > groups:
            raise ValueError(
                f"dynamic_sampling_groups={target} exceeds the {groups} prompts of a generation round on this "
                "rank: raise the data batch_size (the prompts each round generates for) or lower it"
            )
        buffer.rounds += 1
        buffer.groups_generated += groups
        buffer.groups_dropped += int((~varied).sum())
        merge_stats(buffer.stats, stats)
        if varied.any():
            buffer.kept.append(rollout.select(group_rows(varied.nonzero().flatten(), size)))
        kept = buffer.kept_groups(size)
        short = self.reduce_sum(torch.tensor([float(kept < target)], device=self.device))
        capped = buffer.rounds >= self.max_generation_rounds
        if float(short) > 0 and not capped:
            return None  # some rank is still short: every rank generates another round
        parts = list(buffer.kept)
        filler = max(target - kept, 0)
        if filler:  # the cap was hit: zero-advantage groups of this round keep the ranks' batches equal
            parts.append(rollout.select(group_rows((~varied).nonzero().flatten()[:filler], size)))
        train = concat_rollouts(parts, self.tokenizer.pad_token_id)
        if len(train) > target * size:  # surplus groups are dropped: kept for later they would be off-policy
            train = train.select(torch.arange(target * size))
        stats = buffer.stats
        one = torch.ones((), device=self.device)
        stats.add(
            "rollout/dynamic_sampling/drop_fraction", one * buffer.groups_dropped, buffer.groups_generated
        )
        stats.add("rollout/dynamic_sampling/rounds", one * buffer.rounds, 1)
        stats.add("rollout/dynamic_sampling/capped", one * float(float(short) > 0), 1)
        stats.add("rollout/dynamic_sampling/filler_fraction", one * filler, target)
        self.__dict__["_ds_buffer"] = DynamicSamplingBuffer()
        self.add_logprobs(train, stats)
        return train, stats

    def dynamic_sampling_state(self) -> list[dict[str, Any]]:
        """Every rank's buffer (call on every rank: it is a collective with several processes)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return gather_rank_states(self.dynamic_sampling_buffer().state_dict(), world)

    def load_dynamic_sampling_state(self, states: list[dict[str, Any]]) -> None:
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        own = own_rank_state(states, rank, world)
        buffer = DynamicSamplingBuffer()
        if own is not None:
            buffer.load_state_dict(own)
        self.__dict__["_ds_buffer"] = buffer
