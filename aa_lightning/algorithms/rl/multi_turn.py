"""Multi-turn rollouts: policy turns alternate with environment turns (tool results, user turns).

With an ``environment`` configured (:mod:`aa_lightning.environments`), :meth:`MultiTurnMixin.multi_turn_rollout`
replaces the one ``generate`` call of a rollout: every episode's policy turn is sampled (all open episodes in
one batched ``generate``), the environment answers it from the conversation so far, its messages are rendered
with the chat template and appended as tokens, and the next policy turn is sampled from the whole transcript,
until the environment ends the episode, a turn is cut at ``max_new_tokens`` (unless ``end_on_cut_turn`` is
off: the template's end-of-turn text then closes the cut turn, as environment tokens), ``max_turns`` policy
turns were sampled, or the next request (transcript + environment answer + ``max_new_tokens``) would exceed
the engine's length limit (:meth:`~.rollout_engines.base.RolloutEngine.max_sequence_length`: vLLM's
``max_model_len``, the model's ``max_position_embeddings``): the episode then ends before it, logged as
``rollout/transcript_cut``.

The result is an ordinary :class:`~aa_lightning.algorithms.rl.rollout.Rollout` whose response region holds the
whole transcript after the prompt. ``attention_mask`` covers every real token, ``response_mask`` only the
policy's: environment tokens are inputs, never targets, so every loss, KL term and value target that reads
the response mask (all of them) leaves them out, and GAE steps over them
(:func:`~aa_lightning.algorithms.losses.compute_gae`). Per-turn rewards of the environment are stored per token
(``data["turn_rewards"]``, on each turn's last policy token): PPO adds them to its token rewards, GRPO to the
sequence reward. ``responses`` are the last policy turns (what answer-checking rewards read) and each meta
holds the episode as ``meta["conversation"]`` (what the tool-call reward and the sample table read): the
rendered prompt (role ``prompt``), then the ``assistant`` turns and the environment's messages.
"""

from __future__ import annotations

from typing import Any

import torch

from aa_lightning.algorithms.rl.generation import ENGINE_LOGPROBS
from aa_lightning.algorithms.rl.rollout import TEXT_KEYS, Rollout, response_mask_from_eos
from aa_lightning.algorithms.rl.rollout_engines import EngineRequest
from aa_lightning.batch import (
    PER_TOKEN_KEYS,
    extend_per_token_inputs,
    select_sequences,
)
from aa_lightning.environments import CONVERSATION, Environment, parse_tool_calls
from aa_lightning.environments.rendering import ObservationRenderer
from aa_lightning.models.token_outputs import token_output_codec
from aa_lightning.models.unwrap import unwrap

__all__ = ["TURN_REWARDS", "MultiTurnMixin", "ObservationRenderer", "turns_markdown"]

#: ``(N, R)`` float data key of a multi-turn rollout: each environment reward on its turn's last policy token.
TURN_REWARDS = "turn_rewards"
_TURN_SEED_STRIDE = 7919  # seed offsets of later turns (validation uses offsets from 1_000_000 on)


def turns_markdown(metas: list[dict[str, Any]], max_chars: int = 300) -> str:
    """A markdown table of the episodes' turns, one row per message with its role (TensorBoard text)."""

    def cell(text: Any) -> str:
        text = str(text)
        text = text if len(text) <= max_chars else text[: max_chars - 3] + "..."
        return text.replace("|", "\\|").replace("\r", " ").replace("\n", "<br>")

    rows = ["| # | turn | role | text |", "|---|---|---|---|"]
    for i, meta in enumerate(metas):
        for k, message in enumerate(meta.get(CONVERSATION) or []):
            rows.append(f"| {i} | {k} | {message.get('role')} | {cell(message.get('content', ''))} |")
    return "\n".join(rows)


def _per_token_keys(extras: dict[str, torch.Tensor], prompt_ids: torch.Tensor, per_token: Any) -> set[str]:
    """The per-token inputs (the rule of :func:`~aa_lightning.batch.extend_per_token_inputs`)."""
    if per_token is not None:
        return {k for k in extras if k in per_token}
    return {
        k
        for k, v in extras.items()
        if v.shape == prompt_ids.shape and not v.is_floating_point() and not v.is_complex()
    }


class MultiTurnMixin:
    """Mixed into :class:`~aa_lightning.algorithms.rl.module.OnlineRLModule` (reads ``environment``,
    ``max_turns``, ``max_observation_tokens`` and the generation helpers of :mod:`.generation`)."""

    environment: Environment | None

    def observation_renderer(self) -> ObservationRenderer:
        if "_observation_renderer" not in self.__dict__:
            from aa_lightning.models.registry import MODEL_REGISTRY

            model_type = getattr(getattr(unwrap(self.model), "config", None), "model_type", None)
            model_class = MODEL_REGISTRY.get(model_type, None) if model_type else None
            self.__dict__["_observation_renderer"] = ObservationRenderer(
                self.tokenizer, self.processor, model_class
            )
        return self.__dict__["_observation_renderer"]

    def _synced_generation(self, kwargs: dict[str, Any]) -> bool:
        return bool(kwargs.get("synced_gpus"))

    def _any_rank(self, count: int) -> int:
        """The largest ``count`` over the ranks (every rank must call a synced ``generate`` equally often)."""
        value = torch.tensor(float(count), device=self.device)
        return int(self.trainer.strategy.reduce(value, reduce_op="max").item())

    @torch.no_grad()
    def multi_turn_rollout(
        self, batch: dict[str, Any], num_samples: int = 1, do_sample: bool | None = None, seed_offset: int = 0
    ) -> Rollout:
        """``num_samples`` episodes per prompt (groups contiguous), each up to ``max_turns`` policy turns."""
        env = self.environment
        if env is None:
            raise ValueError("multi_turn_rollout needs an environment (model.init_args.environment)")
        if token_output_codec(unwrap(self.model), self.tokenizer, self.processor) is not None:
            raise ValueError(
                f"environment: {self.model_name_or_path!r} generates non-text outputs (an image's token grid); "
                "multi-turn rollouts alternate text turns"
            )
        inputs, metas, prompts, media_rows = self.repeated_prompts(batch, num_samples)
        prompt_ids, prompt_attention = inputs["input_ids"], inputs["attention_mask"]
        extras = {k: v for k, v in inputs.items() if k not in TEXT_KEYS}
        per_token = batch.get(PER_TOKEN_KEYS)
        per_token_keys = _per_token_keys(extras, prompt_ids, per_token)
        n = len(prompts)
        eos_ids = self.eos_token_ids()
        pad = self.pad_token_id()
        real = prompt_attention.bool()
        prefix = [prompt_ids[i][real[i]].tolist() for i in range(n)]  # each prompt's real tokens
        response: list[list[int]] = [[] for _ in range(n)]
        policy: list[list[bool]] = [[] for _ in range(n)]
        rewards: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        # the prompt as rendered by the chat template (its own user/system turns and tool block included)
        conversations = [
            [{"role": "prompt", "content": self.tokenizer.decode(ids, skip_special_tokens=False)}]
            for ids in prefix
        ]
        has_eos = [True] * n
        overflow = [False] * n
        cut = [False] * n  # ended: the next request would not fit the engine's length limit
        active = list(range(n))
        renderer = self.observation_renderer()
        engine = self.rollout_engine()
        sampling = self.sampling_settings(do_sample)
        engine_logprobs: list[list[float]] | None = (
            [[] for _ in range(n)] if engine.reports_logprobs else None
        )
        synced = self._synced_generation(self.generation_kwargs(do_sample))
        length_limit = engine.max_sequence_length(self)

        def request(turn_inputs: dict[str, torch.Tensor], rows: list[int], turn: int = 0) -> EngineRequest:
            return EngineRequest(
                inputs=turn_inputs,
                sampling=sampling,
                # an engine that seeds each request (vLLM) draws each turn from its own stream; the default
                # engine seeds its session once (seed_offset) and reads no per-request seed
                seed=self.rollout_seed(seed_offset + _TURN_SEED_STRIDE * turn),
                seed_offset=seed_offset,
                do_sample=do_sample,
                metas=[metas[i] for i in rows],
            )

        # one engine session for every turn (the actor gathered once under ZeRO-3, the RNG seeded once)
        with engine.session(self, request(inputs, list(range(n)))):
            for turn in range(self.max_turns):
                if (self._any_rank(len(active)) if synced else len(active)) == 0:
                    break
                # a rank without open episodes still joins a synced generate, with row 0's prompt alone (its
                # transcript may already be at the length limit; the dummy reply is thrown away)
                rows = active or [0]
                turn_inputs = self._turn_inputs(
                    rows,
                    prefix,
                    response if active else [[]] * n,
                    prompt_ids,
                    real,
                    extras,
                    per_token_keys,
                    media_rows,
                )
                completions = engine.generate(self, request(turn_inputs, rows, turn))
                if not active:
                    continue
                generated = completions.response_ids
                mask, eos = response_mask_from_eos(generated, eos_ids)
                still_open = []
                for j, i in enumerate(rows):
                    new = generated[j][mask[j]].tolist()
                    response[i] += new
                    policy[i] += [True] * len(new)
                    if engine_logprobs is not None and completions.logprobs is not None:
                        engine_logprobs[i] += completions.logprobs[j][mask[j]].float().tolist()
                    conversations[i].append(
                        {"role": "assistant", "content": self.tokenizer.decode(new, skip_special_tokens=True)}
                    )
                    has_eos[i] = bool(eos[j])
                    if not has_eos[i] and self.end_on_cut_turn:  # cut at max_new_tokens: ends unfinished
                        continue
                    step = env.step(conversations[i], metas[i])
                    if step.reward:
                        rewards[i].append((len(response[i]) - 1, float(step.reward)))
                    if step.done or not step.messages or turn == self.max_turns - 1:
                        continue
                    # a cut turn is closed by the template's end-of-turn text, among the environment's tokens
                    obs = renderer.ids(step.messages, new[-1] if has_eos[i] else None)
                    if len(obs) > self.max_observation_tokens:
                        overflow[i] = True
                        continue
                    next_request = len(prefix[i]) + len(response[i]) + len(obs) + sampling.max_new_tokens
                    if length_limit is not None and next_request > length_limit:
                        cut[i] = True
                        continue
                    response[i] += obs
                    policy[i] += [False] * len(obs)
                    if engine_logprobs is not None:
                        engine_logprobs[i] += [0.0] * len(obs)
                    conversations[i].extend(dict(m) for m in step.messages)
                    still_open.append(i)
                active = still_open
        rollout = self._assemble(
            prompt_ids,
            prompt_attention,
            extras,
            per_token,
            media_rows,
            response,
            policy,
            rewards,
            conversations,
            has_eos,
            overflow,
            cut,
            prompts,
            metas,
            pad,
        )
        if (
            engine_logprobs is not None
        ):  # the engine's sampling log-probs on the policy tokens (gap metric, TIS)
            values = torch.zeros(
                rollout.response_mask.shape, dtype=torch.float32, device=rollout.sequences.device
            )
            for i, row in enumerate(engine_logprobs):
                values[i, : len(row)] = torch.tensor(row, dtype=torch.float32, device=values.device)
            rollout[ENGINE_LOGPROBS] = torch.where(rollout.response_mask, values, 0.0)
        return rollout

    def _turn_inputs(
        self,
        rows: list[int],
        prefix: list[list[int]],
        response: list[list[int]],
        prompt_ids: torch.Tensor,
        prompt_real: torch.Tensor,
        extras: dict[str, torch.Tensor],
        per_token_keys: set[str],
        media_rows: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The open episodes' transcripts, left-padded, with their media and per-token inputs."""
        sequences = [prefix[i] + response[i] for i in rows]
        width = max(len(s) for s in sequences)
        pad = self.pad_token_id()
        device = prompt_ids.device
        ids = torch.full((len(rows), width), pad, dtype=prompt_ids.dtype, device=device)
        attention = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for j, seq in enumerate(sequences):
            ids[j, width - len(seq) :] = torch.tensor(seq, dtype=ids.dtype, device=device)
            attention[j, width - len(seq) :] = 1
        picked = select_sequences(extras, torch.tensor(rows), prompt_ids.shape[0], media_rows)
        for key in per_token_keys:  # the prompt's values on its real tokens, zeros on the transcript
            values = extras[key]
            out = values.new_zeros((len(rows), width))
            for j, i in enumerate(rows):
                start = width - len(sequences[j])
                out[j, start : start + len(prefix[i])] = values[i][prompt_real[i]]
            picked[key] = out
        return {**picked, "input_ids": ids, "attention_mask": attention}

    def _assemble(
        self,
        prompt_ids: torch.Tensor,
        prompt_attention: torch.Tensor,
        extras: dict[str, torch.Tensor],
        per_token: Any,
        media_rows: dict[str, torch.Tensor],
        response: list[list[int]],
        policy: list[list[bool]],
        rewards: list[list[tuple[int, float]]],
        conversations: list[list[dict[str, Any]]],
        has_eos: list[bool],
        overflow: list[bool],
        cut: list[bool],
        prompts: list[str],
        metas: list[dict[str, Any]],
        pad: int,
    ) -> Rollout:
        n, device = len(response), prompt_ids.device
        width = max(1, max(len(r) for r in response))
        ids = torch.full((n, width), pad, dtype=prompt_ids.dtype, device=device)
        policy_mask = torch.zeros((n, width), dtype=torch.bool, device=device)
        real = torch.zeros((n, width), dtype=prompt_attention.dtype, device=device)
        turn_rewards = torch.zeros((n, width), dtype=torch.float32, device=device)
        tool_calls = torch.zeros(n, dtype=torch.float32, device=device)
        for i in range(n):
            length = len(response[i])
            ids[i, :length] = torch.tensor(response[i], dtype=ids.dtype, device=device)
            policy_mask[i, :length] = torch.tensor(policy[i], dtype=torch.bool, device=device)
            real[i, :length] = 1
            for position, value in rewards[i]:
                turn_rewards[i, position] += value
            tool_calls[i] = sum(
                len(parse_tool_calls(m["content"]).calls)
                for m in conversations[i]
                if m["role"] == "assistant"
            )
        assistant_turns = [[m for m in c if m["role"] == "assistant"] for c in conversations]
        return Rollout(
            sequences=torch.cat([prompt_ids, ids], dim=1),
            attention_mask=torch.cat([prompt_attention, real], dim=1),
            response_mask=policy_mask,
            has_eos=torch.tensor(has_eos, dtype=torch.bool, device=device),
            prompt_length=prompt_ids.shape[1],
            extra_inputs=extend_per_token_inputs(extras, prompt_ids, width, per_token),
            media_rows=media_rows,
            prompts=prompts,
            responses=[turns[-1]["content"] if turns else "" for turns in assistant_turns],
            metas=[{**meta, CONVERSATION: conv} for meta, conv in zip(metas, conversations)],
            data={
                TURN_REWARDS: turn_rewards,
                "policy_turns": torch.tensor([float(len(t)) for t in assistant_turns], device=device),
                "tool_calls": tool_calls,
                "observation_overflow": torch.tensor(overflow, dtype=torch.float32, device=device),
                "transcript_cut": torch.tensor(cut, dtype=torch.float32, device=device),
            },
        )
