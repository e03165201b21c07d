"""Reading and writing diffusers pipeline folders for :class:`~aa_lightning.models.diffusion.LatentDiffusion`
models (``TextToImageDiffusion``: ``StableDiffusionPipeline``; ``TextToVideoDiffusion``:
``TextToVideoSDPipeline``).

A trained model is exported as what users of diffusers already load:
``DiffusionPipeline.from_pretrained(folder)`` on a folder with ``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/`` and ``scheduler/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from aa_lightning.models.zero3_context import outside_zero3_init

if TYPE_CHECKING:
    from aa_lightning.models.diffusion import LatentDiffusion

__all__ = [
    "COMPONENTS",
    "build_pipeline",
    "is_pipeline_folder",
    "load_pipeline_components",
    "pipeline_class_name",
    "save_pipeline",
]

COMPONENTS = ("unet", "vae", "text_encoder")
"""The weight-holding components, as ``LatentDiffusion.state_dict()`` prefixes their keys."""

REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
UNSUPPORTED = ("text_encoder_2", "transformer", "prior", "decoder")  # SDXL, DiT/MMDiT, cascades


def is_pipeline_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local diffusers pipeline folder (it holds ``model_index.json``)."""
    return os.path.isfile(os.path.join(path, "model_index.json"))


def pipeline_class_name(path: str | os.PathLike) -> str:
    """The ``_class_name`` of a pipeline folder's ``model_index.json`` (``""`` when it has none)."""
    with open(os.path.join(path, "model_index.json")) as f:
        return str(json.load(f).get("_class_name") or "")


#: Pipelines that have a safety checker (built and loaded without it).
WITH_SAFETY_CHECKER = ("StableDiffusionPipeline",)


def _no_safety_checker(pipeline_class: str) -> dict[str, Any]:
    if pipeline_class not in WITH_SAFETY_CHECKER:
        return {}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _pipeline_type(pipeline_class: str) -> Any:
    import diffusers

    return getattr(diffusers, pipeline_class)


def build_pipeline(model: LatentDiffusion) -> Any:
    """A ``model.pipeline_class`` pipeline over ``model``'s components: no safety checker, and a fresh copy of
    the inference scheduler, so sampling never changes ``model.scheduler``'s state."""
    pipe = _pipeline_type(model.pipeline_class)(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=type(model.scheduler).from_config(model.scheduler.config),
        **_no_safety_checker(model.pipeline_class),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline_components(
    folder: str | os.PathLike,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    pipeline_class: str = "StableDiffusionPipeline",
    **kwargs: Any,
) -> dict[str, Any]:
    """``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler`` of a pipeline folder.

    Loaded through ``<pipeline_class>.from_pretrained`` (what users of diffusers run: ``StableDiffusionPipeline``
    or ``TextToVideoSDPipeline``), without a safety checker or its feature extractor. Other pipeline layouts
    (SDXL's two text encoders, transformer backbones) are refused by name rather than half-loaded.
    """
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    present = {k for k, v in index.items() if isinstance(v, list) and v and v[0] is not None}
    missing = [name for name in REQUIRED if name not in present]
    extra = [name for name in UNSUPPORTED if name in present]
    if missing or extra:
        raise ValueError(
            f"{folder}: a {index.get('_class_name', 'pipeline')} folder is not a Stable-Diffusion-style "
            f"text-to-image pipeline (missing {missing or 'nothing'}, unsupported {extra or 'nothing'}); "
            "a latent diffusion model takes unet + vae + one text_encoder + tokenizer + scheduler"
        )
    # diffusers does not load into partitioned parameters (it builds on the meta device, or would copy into
    # empty shards): under ZeRO-3 the components load whole and DeepSpeed partitions them when its engine starts
    with outside_zero3_init():
        pipe = _pipeline_type(pipeline_class).from_pretrained(
            folder,
            dtype=dtype,
            **_no_safety_checker(pipeline_class),
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    return {name: getattr(pipe, name) for name in REQUIRED}


def save_pipeline(
    model: LatentDiffusion,
    save_directory: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
    safe_serialization: bool = True,
    **kwargs: Any,
) -> None:
    """Write ``model`` as a pipeline folder (the inference ``scheduler`` is the one saved).

    ``state_dict`` (keys ``unet.*``, ``vae.*``, ``text_encoder.*`` as ``model.state_dict()`` names them; a
    component may be left out) gives the weights to write instead of the live ones, as transformers'
    ``save_pretrained(state_dict=...)`` does: the model itself is not changed. That is what an export needs
    when the live weights are ZeRO-3 shards or carry LoRA layers (``base_layer``/``lora_*`` names) and the
    gathered or merged copy is the one to write.
    """
    parts = split_state_dict(model, state_dict) if state_dict is not None else {}
    model.pipeline().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
    for name, weights in parts.items():
        write_component_weights(
            getattr(model, name), Path(save_directory) / name, weights, safe_serialization
        )


def _plain_names(component: nn.Module) -> set[str]:
    """The state-dict keys ``component`` has without peft's layers (``base_layer`` folded, ``lora_*`` dropped)."""
    names = set()
    for key in component.state_dict():
        if ".lora_" in key or key.startswith("lora_"):
            continue
        names.add(key.replace(".base_layer.", "."))
    return names


def split_state_dict(
    model: LatentDiffusion, state_dict: dict[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """``state_dict`` per component, checked: every key belongs to a component, and a component that is given
    is given whole (a partial UNet would load with random weights where keys are missing)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    stray = []
    for key, tensor in state_dict.items():
        name, _, rest = key.partition(".")
        if name in COMPONENTS and rest:
            parts.setdefault(name, {})[rest] = tensor
        else:
            stray.append(key)
    if stray:
        raise ValueError(f"state_dict keys outside {COMPONENTS}: {stray[:5]}")
    for name, weights in parts.items():
        missing = sorted(_plain_names(getattr(model, name)) - set(weights))
        unexpected = sorted(set(weights) - _plain_names(getattr(model, name)))
        if missing or unexpected:
            raise ValueError(f"state_dict for {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return parts


def write_component_weights(
    component: nn.Module, folder: Path, weights: dict[str, torch.Tensor], safe_serialization: bool
) -> None:
    """Replace the weight files of one saved component with ``weights``, under the file name its library
    loads (diffusers: ``diffusion_pytorch_model.*``, transformers: ``model.safetensors``/``pytorch_model.bin``)."""
    from safetensors.torch import save_file
    from transformers import PreTrainedModel

    for old in folder.iterdir():
        if old.suffix in (".safetensors", ".bin") or old.name.endswith(".index.json"):
            old.unlink()
    stem = "model" if isinstance(component, PreTrainedModel) else "diffusion_pytorch_model"
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    if safe_serialization:
        save_file(tensors, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(tensors, folder / ("pytorch_model.bin" if stem == "model" else f"{stem}.bin"))
