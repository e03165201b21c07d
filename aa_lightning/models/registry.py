"""Model registry: ``config.model_type`` -> the class that loads it.

The idea of align-anything's ``AnyModel``: most models load through the transformers auto classes, but a
user may register a class of their own for a ``model_type`` (the "Accustomed" hook) to supply a chat
template or to map a batch onto the model's forward arguments (for models without a processor).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PretrainedConfig,
    PreTrainedModel,
)

from aa_lightning.registry import Registry

MODEL_REGISTRY: Registry[type[PreTrainedModel]] = Registry("model type")

AUTO_CLASSES: dict[str, Any] = {
    "causal_lm": AutoModelForCausalLM,
    "image_text_to_text": AutoModelForImageTextToText,
    "base": AutoModel,
}


def register_model(model_type: str, *, override: bool = False) -> Callable[[type], type]:
    """Register ``cls`` as the class that loads checkpoints whose ``config.model_type`` is ``model_type``.

    The rule of :class:`~aa_lightning.registry.Registry`: the same class again is fine; a different class for
    a taken ``model_type`` raises unless ``override=True``.
    """
    return MODEL_REGISTRY.register(model_type, override=override)


def resolve_model_class(config: PretrainedConfig, auto_class: str = "causal_lm") -> Any:
    """The registered class for ``config.model_type``, else the auto class that maps it.

    ``auto_class="causal_lm"`` falls back to the image-text-to-text mapping for vision-language models
    and to the architecture named in the config (audio models such as Qwen2-Audio are in neither).
    """
    if config.model_type in MODEL_REGISTRY:
        return MODEL_REGISTRY[config.model_type]
    if auto_class not in AUTO_CLASSES:
        raise ValueError(f"unknown auto_class {auto_class!r}; choose one of {sorted(AUTO_CLASSES)}")
    if auto_class != "causal_lm":
        return AUTO_CLASSES[auto_class]
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    for name in getattr(config, "architectures", None) or []:
        import transformers

        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ValueError(
        f"no model class for model_type {config.model_type!r}: register one with "
        "@register_model(model_type) or set auto_class"
    )


def load_config(name_or_path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
