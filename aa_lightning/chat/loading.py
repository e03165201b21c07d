"""What ``aa chat`` talks to: a run folder's ``hf_model`` export, any model folder or hub name, or an alias.

Loading goes through :func:`~aa_lightning.models.loading.load_pretrained_models`, the loader of training, so an
alias (``smollm2-135m-instruct``, ``tiny-qwen2-vl``) and a registered model class behave as in ``aa fit``.
A LoRA export written as an adapter alone (``lora.merge_on_export: false``) is loaded onto its base model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from aa_lightning.models.aliases import resolve_model_path
from aa_lightning.models.diffusion_pipeline_io import is_pipeline_folder
from aa_lightning.models.loading import load_pretrained_models
from aa_lightning.models.registry import MODEL_REGISTRY, load_config

__all__ = ["LoadedChatModel", "load_chat_model", "resolve_chat_path"]

EXPORT_DIR = "hf_model"  # HFExportCallback's default folder inside a run


@dataclass
class LoadedChatModel:
    """The model (in eval mode, on ``device``), its tokenizer and processor, and the registered class."""

    path: str
    model: torch.nn.Module
    tokenizer: Any
    processor: Any
    model_class: Any
    device: torch.device
    max_length: int


def resolve_chat_path(name_or_path: str) -> str:
    """The model folder of ``name_or_path``: a run folder means its ``hf_model`` export."""
    expanded = os.path.expanduser(name_or_path)
    export = os.path.join(expanded, EXPORT_DIR)
    if os.path.isdir(expanded) and not os.path.exists(os.path.join(expanded, "config.json")):
        if os.path.isdir(export):
            return export
        if not os.path.exists(os.path.join(expanded, "adapter_config.json")) and not is_pipeline_folder(
            expanded
        ):
            raise FileNotFoundError(
                f"{name_or_path} is neither a model folder (no config.json) nor a run folder with an "
                f"{EXPORT_DIR}/ export (is the run finished? the export is written at the end of fit)"
            )
    return resolve_model_path(name_or_path)


def _load_adapter(path: str, dtype: str, trust_remote_code: bool) -> tuple[Any, Any, Any]:
    from peft import PeftModel

    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as handle:
        base = json.load(handle).get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{path}/adapter_config.json names no base_model_name_or_path to load the adapter onto"
        )
    model, tokenizer, processor = load_pretrained_models(
        base, dtype=dtype, padding_side="left", trust_remote_code=trust_remote_code
    )
    return PeftModel.from_pretrained(model, path), tokenizer, processor


def load_chat_model(
    name_or_path: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False
) -> LoadedChatModel:
    """Load ``name_or_path`` for chatting (see module doc); ``device`` ``auto`` is CUDA when there is one."""
    path = resolve_chat_path(name_or_path)
    if is_pipeline_folder(path):
        raise ValueError(
            f"{name_or_path} is a diffusion pipeline: it generates media, not replies; `aa chat` talks to "
            "text and multimodal language models (use `aa predict` for a pipeline's outputs)"
        )
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        model, tokenizer, processor = _load_adapter(path, dtype, trust_remote_code)
        config = model.get_base_model().config
    else:
        model, tokenizer, processor = load_pretrained_models(
            path, dtype=dtype, padding_side="left", trust_remote_code=trust_remote_code
        )
        config = load_config(path, trust_remote_code=trust_remote_code)
    if not callable(getattr(model, "generate", None)):
        raise ValueError(f"{name_or_path} loads as {type(model).__name__}, which cannot generate replies")
    target = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device == "auto"
        else torch.device(device)
    )
    model.to(target).eval()
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None) or 1 << 30
    return LoadedChatModel(
        path=path,
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        model_class=MODEL_REGISTRY.get(config.model_type, None),
        device=target,
        max_length=int(limit),
    )
