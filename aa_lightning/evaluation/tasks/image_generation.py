"""Generated images scored by CLIP: how well an image-output model's pictures match their prompts.

Images come from the evaluated model: a diffusers pipeline folder (``tiny-sd``, a Diffusion-DPO run) samples
through its model class's ``generate(prompts, ...)``, one seeded generator per row; an autoregressive
image-token family (Emu3, Janus) through its token-output codec (the hook RL rollouts and ``aa predict`` use,
so nothing here names a family). Or from stored files
(``responses_field``: image paths, relative to the data file). The score is CLIP-score,
``max(100 * cos(E_image, E_text), 0)`` with ``clip_model``'s projected embeddings (Hessel et al., 2021),
averaged over rows.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from aa_lightning.chat.loading import resolve_chat_path
from aa_lightning.data.sources import media_root
from aa_lightning.evaluation.registry import register_task
from aa_lightning.evaluation.task import EvalContext, EvalData, EvalRow, EvalTask, RowResult
from aa_lightning.evaluation.tasks.prompts import format_fields
from aa_lightning.models.token_outputs import token_output_codec


class ClipScorer:
    """A CLIP model folder (model, tokenizer, image processor; ``trust_remote_code`` off)."""

    def __init__(self, path: str, device: torch.device) -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self.model = AutoModel.from_pretrained(path, trust_remote_code=False).to(device).eval()
        if not callable(getattr(self.model, "get_image_features", None)):
            raise ValueError(f"{path}: loads as {type(self.model).__name__}, not a CLIP-style model")
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        self.images = AutoImageProcessor.from_pretrained(path, trust_remote_code=False)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list[Any], texts: list[str]) -> list[float]:
        pixels = self.images(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        limit = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        text = self.tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        image_emb = _features(self.model.get_image_features(pixel_values=pixels))
        text_emb = _features(
            self.model.get_text_features(
                input_ids=text["input_ids"].to(self.device),
                attention_mask=text["attention_mask"].to(self.device),
            )
        )
        cos = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
        return (100 * cos).clamp(min=0).tolist()


def _features(output: Any) -> torch.Tensor:
    """transformers 5 returns a model output (``pooler_output`` = the projected embedding); 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@register_task("clip_score")
class ClipScoreTask(EvalTask):
    """CLIP-score of the images an image-output model generates for text prompts (see module doc).

    Args:
        clip_model: the CLIP model folder that scores (image, prompt) pairs.
        prompt_format: the prompt text over the row's fields (default ``{prompt}``).
        responses_field: score stored images instead of generating: a path (or a list, its first path),
            relative to the data file's folder.
        num_inference_steps / guidance_scale: sampling of a diffusion pipeline.
    """

    metrics = ("clip_score",)

    def __init__(
        self,
        data: EvalData | dict[str, Any] | str,
        clip_model: str | None = None,
        prompt_format: str = "{prompt}",
        responses_field: str | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(data, **kwargs)
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        if not clip_model:
            raise ValueError(
                f"task {self.name}: set `clip_model` (a CLIP model folder that scores the images)"
            )
        self.clip_model, self.prompt_format, self.responses_field = clip_model, prompt_format, responses_field
        self.scorer: ClipScorer | None = None

    def stored_images(self, rows: list[EvalRow]) -> list[Any]:
        from PIL import Image

        assert self.responses_field is not None
        root = media_root(self.spec())
        out = []
        for row in rows:
            value = row.get(self.responses_field, (str, list))
            path = os.path.join(root, str(value[0] if isinstance(value, list) and value else value))
            if not os.path.exists(path):
                raise row.error(f"image file not found: {path}", self.responses_field)
            out.append(Image.open(path).convert("RGB"))
        return out

    @torch.no_grad()
    def generated_images(self, prompts: list[str], rows: list[EvalRow], context: EvalContext) -> list[Any]:
        path = self.model_path(context)
        pipeline = context.pool.pipeline(path)
        if pipeline is not None:  # a diffusion family: its own sampler, seeded per row (batch-independent)
            seed = context.seed
            generators = [torch.Generator(device="cpu").manual_seed(seed + row.number) for row in rows]
            return pipeline.generate(
                prompts,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                generator=generators,
            )
        loaded = context.pool.lm(path)
        codec = token_output_codec(loaded.model, loaded.tokenizer, loaded.processor)
        if codec is None or not callable(getattr(codec, "prompt_inputs", None)):
            raise ValueError(
                f"task {self.name}: {loaded.path} is no image-output model (its family registers no token-output "
                "codec with prompt_inputs); pass stored images with `responses_field`"
            )
        inputs, metas = codec.prompt_inputs(prompts)
        inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
        settings = self.settings(context)
        sampling = (
            {"temperature": settings.temperature, "top_k": settings.top_k or None}
            if settings.do_sample
            else {}
        )
        out = loaded.model.generate(
            **inputs,
            do_sample=settings.do_sample,
            pad_token_id=loaded.tokenizer.pad_token_id,
            **sampling,
            **codec.generation_overrides(metas),
        )
        return codec.decode(out[:, inputs["input_ids"].shape[1] :], metas)

    def evaluate_batch(self, rows: list[EvalRow], context: EvalContext) -> list[RowResult]:
        prompts = [format_fields(row, self.prompt_format) for row in rows]
        images = (
            self.stored_images(rows)
            if self.responses_field
            else self.generated_images(prompts, rows, context)
        )
        if self.scorer is None:
            self.scorer = ClipScorer(resolve_chat_path(self.clip_model), context.pool.target())
        scores = self.scorer([image.convert("RGB") for image in images], prompts)
        return [
            RowResult({"clip_score": score}, {"prompt": prompt, "image_size": list(image.size)})
            for prompt, image, score in zip(prompts, images, scores)
        ]
