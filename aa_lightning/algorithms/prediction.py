"""``aa predict``: what a module answers for a prompt-only batch, text or a family's own media outputs."""

from __future__ import annotations

from typing import Any

import torch

from aa_lightning.algorithms.config import GenerationConfig
from aa_lightning.batch import META, model_inputs
from aa_lightning.models.token_outputs import token_output_codec
from aa_lightning.models.unwrap import unwrap

__all__ = ["PredictionMixin"]


class PredictionMixin:
    """Mixed into :class:`~aa_lightning.algorithms.base.AlignModule` (reads ``generation``, ``tokenizer`` and
    ``generation_model()``)."""

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Answers to the prompts of a prompt-only batch, as dicts ``{prompt, response, meta}``; a model family
        that generates other outputs (``generate_outputs``: images, audio, video) gives ``{prompt, output, meta}``,
        which the prediction writer saves as files; so does a causal family whose outputs are tokens of another
        kind (:mod:`aa_lightning.models.token_outputs`: an image model's token grid, decoded to images)."""
        gen = self.generation or GenerationConfig(do_sample=False)
        model = unwrap(self.generation_model())
        inputs = model_inputs(batch, model)
        metas = batch.get(META) or [{} for _ in range(inputs["input_ids"].shape[0])]
        prompts = self.tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=True)
        family = model.get_base_model() if hasattr(model, "get_base_model") else model
        if callable(getattr(family, "generate_outputs", None)):  # the family generates its own kind of output
            outputs = family.generate_outputs(**inputs, generation=gen)
            return [{"prompt": p, "output": o, "meta": m} for p, o, m in zip(prompts, outputs, metas)]
        sampling = dict(
            do_sample=gen.do_sample,
            temperature=gen.temperature if gen.do_sample else None,
            top_p=gen.top_p if gen.do_sample else None,
            top_k=gen.top_k if gen.do_sample else None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        codec = token_output_codec(model, self.tokenizer, getattr(self, "processor", None))
        overrides = codec.generation_overrides(metas) if codec is not None else {}
        if overrides:  # an image family's token grid: sampled under its constraint, decoded to images
            overrides.setdefault("max_new_tokens", gen.max_new_tokens)
            out = model.generate(**inputs, **sampling, **overrides)
            outputs = codec.decode(out[:, inputs["input_ids"].shape[1] :], metas)
            return [{"prompt": p, "output": o, "meta": m} for p, o, m in zip(prompts, outputs, metas)]
        out = model.generate(
            **inputs, **sampling, max_new_tokens=gen.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id
        )
        responses = self.tokenizer.batch_decode(
            out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        return [{"prompt": p, "response": r, "meta": m} for p, r, m in zip(prompts, responses, metas)]
