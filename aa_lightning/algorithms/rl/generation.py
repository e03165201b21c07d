"""Sampling of the rollouts: seeding, ``generate`` arguments, the ZeRO-3 generation context, one batched call.

The call goes to the configured rollout engine (:mod:`.rollout_engines`; ``rollout_engine: hf``, the default,
is the KV-cached ``generate`` described here, ``vllm`` a colocated vLLM); the engine's own sampling log-probs,
when it reports them, are kept as ``data["engine_logprobs"]``. One KV-cached ``generate`` call per rollout with every model input of the prompt batch (all top-level tensors
except ``labels``, so media inputs flow through untouched); the response mask keeps tokens up to and
including the first EOS. A family whose responses are not text (an image model's token grid) adds its
``generate`` constraints and decodes the responses itself (:mod:`aa_lightning.models.token_outputs`), so the
rewards see images; the algorithm never asks which. A family that samples its own multi-step trajectories
(a diffusion model's denoising chain, :mod:`aa_lightning.models.trajectories`) is handed the prompts instead
of ``generate``: its steps become the response "tokens" (all kept) and its decoded outputs the responses. Per-token inputs of the prompt are extended with zeros over the response
(:func:`aa_lightning.batch.extend_per_token_inputs`), so the training forwards see what ``generate`` saw;
media rows go with their prompt when it is repeated (:func:`aa_lightning.batch.repeat_batch_inputs`). Sampling is seeded per rollout from ``(rollout_seed, rollout index, rank)`` inside
``torch.random.fork_rng``, so a resumed run samples exactly what the uninterrupted run would have, and the
global RNG is left alone. Under ZeRO-3 the actor is gathered once per rollout
(``zero3_gather_for_generation``); with more than one process ``generate`` runs with ``synced_gpus=True``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from aa_lightning.algorithms.rl.rollout import TEXT_KEYS, Rollout, response_mask_from_eos
from aa_lightning.algorithms.rl.rollout_engines import (
    EngineRequest,
    RolloutEngine,
    SamplingSettings,
    build_rollout_engine,
)
from aa_lightning.batch import (
    MEDIA_ROWS,
    META,
    PER_TOKEN_KEYS,
    extend_per_token_inputs,
    model_inputs,
    repeat_batch_inputs,
    select_media_rows,
)
from aa_lightning.models.token_outputs import token_output_codec
from aa_lightning.models.trajectories import trajectory_family
from aa_lightning.models.turns import end_of_turn_token_ids
from aa_lightning.models.unwrap import unwrap

__all__ = ["ENGINE_LOGPROBS", "GenerationMixin"]

#: rollout data key of the engine's sampling log-probs ``(N, R)`` (set when the engine reports them)
ENGINE_LOGPROBS = "engine_logprobs"


class GenerationMixin:
    """Mixed into :class:`~aa_lightning.algorithms.rl.module.OnlineRLModule` (reads ``generation``,
    ``zero3_gather_for_generation``, ``rollout_engine_name``, ``rollout_engine_args``, ``_base_seed`` and
    ``_rollout_index``)."""

    # -- RNG -------------------------------------------------------------------------------------------
    def rollout_seed(self, offset: int = 0) -> int:
        base = self._base_seed if self._base_seed is not None else int(torch.initial_seed()) % (2**31)
        rank = self.global_rank if self._trainer is not None else 0
        return (base * 1_000_003 + self._rollout_index * 10_007 + rank * 101 + offset) % (2**63 - 1)

    @contextlib.contextmanager
    def seeded(self, offset: int = 0) -> Iterator[None]:
        """Run with the torch RNG seeded for this rollout; the global RNG state is restored afterwards."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.rollout_seed(offset))
            yield

    # -- generation ------------------------------------------------------------------------------------
    def eos_token_ids(self) -> list[int]:
        ids: set[int] = set()
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_eos = getattr(getattr(unwrap(self.model), "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            ids.update(int(i) for i in gen_eos)
        if "_turn_end_ids" not in self.__dict__:  # where trained rows end (read once from the chat template)
            self.__dict__["_turn_end_ids"] = end_of_turn_token_ids(self.tokenizer, self.processor)
        ids.update(self.__dict__["_turn_end_ids"])
        if not ids:
            raise ValueError("the tokenizer has no EOS token: responses could never end")
        return sorted(ids)

    def generation_kwargs(self, do_sample: bool | None = None) -> dict[str, Any]:
        """``generate`` arguments: a fresh ``GenerationConfig`` with exactly the configured sampling settings.

        The checkpoint's own generation config (repetition penalties, default top-k ...) is deliberately
        not used: the log-probs of the update must describe the distribution the tokens were drawn from.
        (``top_p``/``top_k`` truncation is the one usual exception, ignored in the log-probs as in most RLHF
        systems.)
        """
        from transformers import GenerationConfig as HFGenerationConfig

        cfg = self.generation
        sample = cfg.do_sample if do_sample is None else do_sample
        config = HFGenerationConfig(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=sample,
            temperature=cfg.temperature if sample else None,
            # explicit values: None would let transformers fill in its defaults (top_k=50), so the tokens would
            # come from a truncated distribution the log-probs do not describe
            top_p=cfg.top_p if sample else None,
            top_k=cfg.top_k if sample else None,
            eos_token_id=self.eos_token_ids(),
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
        )
        kwargs: dict[str, Any] = {"generation_config": config}
        if self.zero_stage() == 3 and self.trainer.world_size > 1:
            kwargs["synced_gpus"] = True
        return kwargs

    def pad_token_id(self) -> int:
        """The id responses and transcripts are padded with: the tokenizer's pad, else its first EOS."""
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else self.eos_token_ids()[0]

    def sampling_settings(self, do_sample: bool | None = None) -> SamplingSettings:
        """The configured sampling settings, resolved for one engine request."""
        cfg = self.generation
        eos = self.eos_token_ids()
        return SamplingSettings(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=cfg.do_sample if do_sample is None else do_sample,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            eos_token_ids=tuple(eos),
            pad_token_id=self.pad_token_id(),
        )

    # -- the rollout engine ------------------------------------------------------------------------------
    def rollout_engine(self) -> RolloutEngine:
        """The engine named by ``rollout_engine`` (built on first use, one per module)."""
        engine = self.__dict__.get("_rollout_engine_instance")
        if engine is None:
            engine = build_rollout_engine(self.rollout_engine_name, self.rollout_engine_args)
            self.__dict__["_rollout_engine_instance"] = engine
        return engine

    def policy_update_starting(self) -> None:
        """Before the forwards of each update minibatch: an engine may release its device memory (sleep)."""
        engine = self.__dict__.get("_rollout_engine_instance")
        if engine is not None:
            engine.before_policy_update(self)

    def policy_weights_updated(self) -> None:
        """After every optimizer update: an engine holding its own weights must re-sync before sampling."""
        engine = self.__dict__.get("_rollout_engine_instance")
        if engine is not None:
            engine.on_weights_updated(self)

    def close_rollout_engine(self) -> None:
        engine = self.__dict__.pop("_rollout_engine_instance", None)
        if engine is not None:
            engine.close()

    def generation_context(self) -> contextlib.AbstractContextManager:
        return self.deepspeed_adapter().generation_context(self.model, self.zero3_gather_for_generation)

    def repeated_prompts(
        self, batch: dict[str, Any], num_samples: int
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], list[str], dict[str, torch.Tensor]]:
        """A prompt batch's model inputs, metas, decoded prompts and media rows, each row repeated
        ``num_samples`` times (groups contiguous): what every rollout (one turn or several) starts from."""
        inputs = model_inputs(batch, self.model)
        for key in TEXT_KEYS:
            if key not in inputs:
                raise ValueError(f"a prompt-only batch needs {key!r}")
        batch_size = inputs["input_ids"].shape[0]
        metas = list(batch.get(META) or [{} for _ in range(batch_size)])
        prompt_texts = self.tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=True)
        media_rows = dict(batch.get(MEDIA_ROWS) or {})
        inputs = repeat_batch_inputs(inputs, num_samples, batch_size, media_rows)
        if media_rows:
            media_rows = select_media_rows(
                media_rows, torch.arange(batch_size).repeat_interleave(num_samples)
            )
        metas = [m for m in metas for _ in range(num_samples)]
        prompts = [p for p in prompt_texts for _ in range(num_samples)]
        return inputs, metas, prompts, media_rows

    @torch.no_grad()
    def generate_rollout(
        self, batch: dict[str, Any], num_samples: int = 1, do_sample: bool | None = None, seed_offset: int = 0
    ) -> Rollout:
        """Sample ``num_samples`` responses per prompt (groups are contiguous) in ONE ``generate`` call."""
        if getattr(self, "environment", None) is not None:  # episodes of several turns (:mod:`.multi_turn`)
            return self.multi_turn_rollout(batch, num_samples, do_sample, seed_offset)
        inputs, metas, prompts, media_rows = self.repeated_prompts(batch, num_samples)
        prompt_length = inputs["input_ids"].shape[1]
        family = trajectory_family(self.model)
        if family is not None:  # the family samples (and decodes) its own trajectories
            return self.trajectory_rollout(family, inputs, prompts, metas, do_sample, seed_offset)
        codec = token_output_codec(unwrap(self.model), self.tokenizer, self.processor)
        engine = self.rollout_engine()
        request = EngineRequest(
            inputs=inputs,
            sampling=self.sampling_settings(do_sample),
            seed=self.rollout_seed(seed_offset),
            seed_offset=seed_offset,
            do_sample=do_sample,
            generate_overrides=codec.generation_overrides(metas) if codec is not None else {},
            metas=metas,
        )
        with engine.session(self, request):
            completions = engine.generate(self, request)
            response = completions.response_ids
            mask, has_eos = response_mask_from_eos(response, self.eos_token_ids())
            response = torch.where(mask, response, torch.full_like(response, self.pad_token_id()))
            # decoded inside the session: an image family decodes with its own weights (gathered under ZeRO-3)
            outputs = (
                codec.decode(response, metas)
                if codec is not None
                else self.tokenizer.batch_decode(response, skip_special_tokens=True)
            )
        data: dict[str, torch.Tensor] = {}
        if completions.logprobs is not None:  # the sampler's own log-probs (gap metric, TIS)
            data[ENGINE_LOGPROBS] = torch.where(mask, completions.logprobs.to(mask.device).float(), 0.0)
        sequences = torch.cat([inputs["input_ids"], response.to(inputs["input_ids"].device)], dim=1)
        attention_mask = torch.cat([inputs["attention_mask"], mask.to(inputs["attention_mask"].dtype)], dim=1)
        extras = extend_per_token_inputs(
            {k: v for k, v in inputs.items() if k not in TEXT_KEYS},
            inputs["input_ids"],
            response.shape[1],
            batch.get(PER_TOKEN_KEYS),
        )
        return Rollout(
            sequences=sequences,
            attention_mask=attention_mask,
            response_mask=mask,
            has_eos=has_eos,
            prompt_length=prompt_length,
            extra_inputs=extras,
            media_rows=media_rows,
            prompts=prompts,
            responses=outputs,
            metas=metas,
            data=data,
        )

    def trajectory_rollout(
        self,
        family: Any,
        inputs: dict[str, torch.Tensor],
        prompts: list[str],
        metas: list[dict[str, Any]],
        do_sample: bool | None,
        seed_offset: int,
    ) -> Rollout:
        """The rollout of a family that samples its own trajectories: ``sequences`` = prompt + the steps'
        timesteps (every step kept, no EOS to wait for), ``trajectory`` = the family's record of the steps,
        ``data["sampling_logprobs"]`` = the step log-probs the sampler drew with. ``do_sample: false``
        (validation) asks for a deterministic chain."""
        sample = self.generation.do_sample if do_sample is None else do_sample
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        was_training = self.model.training
        self.model.eval()
        try:
            with self.generation_context():
                sampled = family.sample_trajectories(
                    ids, attention, self.generation, seed=self.rollout_seed(seed_offset), stochastic=sample
                )
        finally:
            self.model.train(was_training)
        steps = sampled.timesteps.to(ids.device, ids.dtype)
        mask = torch.ones_like(steps, dtype=torch.bool)
        return Rollout(
            sequences=torch.cat([ids, steps], dim=1),
            attention_mask=torch.cat([attention, mask.to(attention.dtype)], dim=1),
            response_mask=mask,
            has_eos=torch.ones(len(steps), dtype=torch.bool, device=steps.device),
            prompt_length=ids.shape[1],
            prompts=prompts,
            responses=sampled.outputs,
            metas=metas,
            data={"sampling_logprobs": sampled.log_probs},
            trajectory=sampled.trajectory,
        )
