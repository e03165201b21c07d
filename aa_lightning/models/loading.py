"""Step 1 of the four (model initialisation): load model, tokenizer and processor from one path."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from transformers import AutoModel, AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase, ProcessorMixin

from aa_lightning.models.aliases import resolve_model_path
from aa_lightning.models.diffusion_pipeline_io import is_pipeline_folder, pipeline_class_name
from aa_lightning.models.family_repairs import repair_loaded_model
from aa_lightning.models.registry import MODEL_REGISTRY, load_config, resolve_model_class
from aa_lightning.models.score_model import ScoreModel
from aa_lightning.models.zero3_context import import_model_code

log = logging.getLogger(__name__)

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]


def to_torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def load_tokenizer_and_processor(
    name_or_path: str,
    padding_side: Literal["left", "right"] = "right",
    model_max_length: int | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedTokenizerBase, ProcessorMixin | None]:
    """The tokenizer, and the processor when the checkpoint has one (multimodal models).

    A missing pad token falls back to the EOS token, since batching needs one. A diffusers pipeline folder's
    tokenizer is its ``tokenizer/`` subfolder.
    """
    path = resolve_model_path(name_or_path)
    processor: ProcessorMixin | None = None
    if is_pipeline_folder(path):
        tokenizer = AutoTokenizer.from_pretrained(
            path, subfolder="tokenizer", trust_remote_code=trust_remote_code
        )
        return _finish_tokenizer(tokenizer, name_or_path, padding_side, model_max_length), None
    try:
        loaded = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        if isinstance(loaded, ProcessorMixin) and hasattr(loaded, "tokenizer"):
            processor = loaded
    except (OSError, ValueError, TypeError, KeyError):
        processor = None
    tokenizer = (
        processor.tokenizer
        if processor is not None
        else AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    )
    return _finish_tokenizer(tokenizer, name_or_path, padding_side, model_max_length), processor


def _finish_tokenizer(
    tokenizer: PreTrainedTokenizerBase,
    name_or_path: str,
    padding_side: Literal["left", "right"],
    model_max_length: int | None,
) -> PreTrainedTokenizerBase:
    """Padding side, length limit and a pad token (the EOS token when missing), whichever way it was loaded."""
    tokenizer.padding_side = padding_side
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{name_or_path}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("%s: no pad token; using the eos token %r for padding", name_or_path, tokenizer.eos_token)
    return tokenizer


def load_pretrained_models(
    name_or_path: str,
    *,
    dtype: DTypeName | torch.dtype = "auto",
    padding_side: Literal["left", "right"] = "right",
    model_max_length: int | None = None,
    trust_remote_code: bool = False,
    auto_class: str = "causal_lm",
    score_model: bool = False,
    score_head_init_std: float | None = None,
    new_score_head: bool = False,
    score_head_bias: bool = False,
    attn_implementation: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, ProcessorMixin | None]:
    """Load ``(model, tokenizer, processor)``; ``processor`` is None for text-only checkpoints.

    ``name_or_path`` may be a local folder, a hub name, or an alias of an embedded model
    (``smollm2-135m-instruct``, ``tiny-llama``, ...). The model class comes from the registry
    (``@register_model``) and falls back to the transformers auto classes. ``score_model=True`` gives a
    :class:`ScoreModel` (backbone + score head) for reward/cost models and critics; a folder without a trained
    head is refused unless ``new_score_head=True`` (a new head, with a bias if ``score_head_bias``). A diffusers pipeline
    folder (``model_index.json``, e.g. ``tiny-sd``, ``tiny-t2v``, ``tiny-audioldm``) gives
    ``(LatentDiffusion, tokenizer, None)``: the class is picked by the folder's ``_class_name``
    (:data:`DIFFUSION_CLASSES`).
    """
    path = resolve_model_path(name_or_path)
    if is_pipeline_folder(path):
        return load_diffusion_pipeline(
            path,
            dtype=dtype,
            padding_side=padding_side,
            model_max_length=model_max_length,
            trust_remote_code=trust_remote_code,
            score_model=score_model,
            attn_implementation=attn_implementation,
            model_kwargs=model_kwargs,
        )
    config = load_config(path, trust_remote_code=trust_remote_code)
    import_model_code(config)  # before zero.Init can wrap half-built classes (zero3_context.py)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **(model_kwargs or {})}
    torch_dtype = to_torch_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if score_model:
        backbone_class = MODEL_REGISTRY.get(f"{config.model_type}:score", AutoModel)
        model: torch.nn.Module = ScoreModel.from_pretrained(
            path,
            backbone_class=backbone_class,
            head_init_std=score_head_init_std,
            new_score_head=new_score_head,
            head_bias=score_head_bias,
            **kwargs,
        )
    else:
        model_class = resolve_model_class(config, auto_class)
        model = model_class.from_pretrained(path, **kwargs)
    repair_loaded_model(model)
    tokenizer, processor = load_tokenizer_and_processor(
        path,
        padding_side=padding_side,
        model_max_length=model_max_length,
        trust_remote_code=trust_remote_code,
    )
    return model, tokenizer, processor


DIFFUSION_CLASSES: dict[str, str] = {
    "StableDiffusionPipeline": "aa_lightning.models.diffusion:TextToImageDiffusion",
    "TextToVideoSDPipeline": "aa_lightning.models.diffusion:TextToVideoDiffusion",
    "AudioLDMPipeline": "aa_lightning.models.audio_diffusion:TextToAudioDiffusion",
}
"""``model_index.json`` ``_class_name`` -> ``module:Class`` of the model class that loads it."""


def diffusion_class(path: str) -> type[torch.nn.Module]:
    """The model class for the pipeline folder ``path``, by its ``_class_name`` (refused by name if unknown)."""
    import importlib

    name = pipeline_class_name(path)
    if name not in DIFFUSION_CLASSES:
        raise ValueError(
            f"{path}: a {name or 'nameless'} pipeline (model_index.json _class_name) is not supported; "
            f"supported pipelines: {', '.join(DIFFUSION_CLASSES)}"
        )
    module, cls = DIFFUSION_CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_diffusion_pipeline(
    path: str,
    *,
    dtype: DTypeName | torch.dtype = "auto",
    padding_side: Literal["left", "right"] = "right",
    model_max_length: int | None = None,
    trust_remote_code: bool = False,
    score_model: bool = False,
    attn_implementation: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, None]:
    """``(model, its tokenizer, None)`` for a diffusers pipeline folder: a ``TextToImageDiffusion`` for a
    ``StableDiffusionPipeline``, a ``TextToVideoDiffusion`` for a ``TextToVideoSDPipeline`` (the
    ``_class_name`` of ``model_index.json``; :data:`DIFFUSION_CLASSES`).

    Its tokenizer pads on the right (the text encoder was trained so, and the pipeline samples so); ``dtype``
    ``auto`` keeps diffusers' default (float32).
    """
    if score_model:
        raise ValueError(
            f"{path} is a diffusion pipeline: there is no score (reward/cost) model for diffusion "
            "pipelines yet; point the reward model at a text or multimodal checkpoint"
        )
    if padding_side != "right":
        raise ValueError(f"{path}: diffusion prompts are padded on the right, not {padding_side!r}")
    if attn_implementation not in (None, "sdpa"):
        raise ValueError(
            f"{path}: attn_implementation {attn_implementation!r} is not supported for diffusion pipelines "
            "(diffusers uses scaled-dot-product attention)"
        )
    torch_dtype = to_torch_dtype(dtype)
    model_class = diffusion_class(path)
    model = model_class.from_pretrained(
        path,
        dtype=None if torch_dtype == "auto" else torch_dtype,
        trust_remote_code=trust_remote_code,
        **(model_kwargs or {}),
    )
    model.tokenizer = _finish_tokenizer(model.tokenizer, path, padding_side, model_max_length)
    return model, model.tokenizer, None
