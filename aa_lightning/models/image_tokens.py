"""Autoregressive image generation over discrete VQ tokens (Emu3, Janus): registration and image tokenizers.

Emu3's image tokens live in the language model's vocabulary (see
:mod:`aa_lightning.testing.tiny_image_generation`), so an Emu3 checkpoint trains with the unchanged algorithms:
a batch is ``input_ids`` (prompt + image tokens) and ``labels``, and ``outputs.logits`` scores image tokens
like any text token. What is family-specific is only turning images into tokens and back, done here:

- ``emu3`` is registered to ``Emu3ForConditionalGeneration`` (transformers' causal-LM auto mapping would
  load the text-only ``Emu3ForCausalLM`` and leave the VQ-VAE out);
- :class:`Emu3ImageTokenizer` loads ONLY the frozen VQ-VAE of a checkpoint (its ``vqmodel.*`` weights, no
  language model), so a datamodule can encode its target images once when the data is prepared.

Janus keeps its codes out of the vocabulary (its own embedding and head: :mod:`.janus_generation`);
:class:`JanusImageTokenizer` is its VQ-VAE behind the same ``encode`` / ``decode`` / ``fingerprint``
interface, and :data:`IMAGE_TOKENIZERS` picks the one of a checkpoint by ``config.model_type``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from aa_lightning.models.registry import MODEL_REGISTRY, register_model

__all__ = [
    "IMAGE_TOKENIZERS",
    "Emu3ImageTokenizer",
    "ImageGridConstraint",
    "JanusImageTokenizer",
    "register_image_token_models",
]

_VQ_PREFIXES = ("vqmodel.", "model.vqmodel.")


def register_image_token_models() -> None:
    """Register the autoregressive image-output families (idempotent)."""
    from transformers import Emu3ForConditionalGeneration

    from aa_lightning.models.janus_generation import JanusImageGeneration

    if MODEL_REGISTRY.get("emu3", None) is None:
        register_model("emu3")(Emu3ForConditionalGeneration)
    if MODEL_REGISTRY.get("janus", None) is None:
        register_model("janus")(JanusImageGeneration)


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        names = {file for key, file in weight_map.items() if key.startswith(_VQ_PREFIXES)}
        return [os.path.join(path, name) for name in sorted(names)]
    return [os.path.join(path, "model.safetensors")]


def _checkpoint_config(path: str, model_type: str) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if config.model_type != model_type:
        raise ValueError(
            f"{path}: a {config.model_type!r} checkpoint; this image tokenizer needs a {model_type!r} one "
            "(its VQ-VAE turns the target images into tokens)"
        )
    return config


def _load_vqmodel(path: str, vqmodel: torch.nn.Module) -> torch.nn.Module:
    """``vqmodel`` with the checkpoint's ``vqmodel.*`` weights (only the files that hold them are read)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        for key, value in load_file(file).items():
            for prefix in _VQ_PREFIXES:
                if key.startswith(prefix):
                    state[key[len(prefix) :]] = value
    missing, unexpected = vqmodel.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: the VQ-VAE weights do not match (missing {missing[:3]}, extra {unexpected[:3]})"
        )
    return vqmodel


def _vq_fingerprint(vqmodel: torch.nn.Module) -> str:
    """A hash of every VQ-VAE weight but the decoder's (computed once per tokenizer: the weights are frozen,
    about a second per GB)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(vqmodel.state_dict().items()):
        if not name.startswith("decoder."):
            digest.update(name.encode())
            digest.update(tensor.detach().to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()


class Emu3ImageTokenizer:
    """Images <-> Emu3 BPE image tokens with a checkpoint's frozen VQ-VAE (and its vocabulary map).

    ``encode(pixel_values, image_sizes)`` gives, per image, ``(h, w, ids)``: ``ids`` the ``h * (w + 1)`` BPE
    ids of ``Emu3Model.get_image_tokens`` (each row of ``w`` visual tokens closed by the end-of-line token).
    ``decode(ids, h, w)`` is ``Emu3Model.decode_image_tokens`` on those ids (pixels in [-1, 1]).
    """

    def __init__(self, vqmodel: Any, vocabulary_map: dict[str, int]) -> None:
        from transformers.models.emu3.modeling_emu3 import Emu3ImageVocabularyMapping

        self.vqmodel = vqmodel.eval().requires_grad_(False)
        self.mapping = Emu3ImageVocabularyMapping(vocabulary_map)
        self.spatial_factor = vqmodel.vision_spatial_factor

    @classmethod
    def from_pretrained(cls, path: str) -> Emu3ImageTokenizer:
        from transformers import Emu3VQVAE

        config = _checkpoint_config(path, "emu3")
        return cls(_load_vqmodel(path, Emu3VQVAE(config.vq_config)), config.vocabulary_map)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the codebook and encoder weights: cached encodings follow the VQ-VAE, not its path."""
        return _vq_fingerprint(self.vqmodel)

    @torch.no_grad()
    def encode(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor
    ) -> list[tuple[int, int, list[int]]]:
        out = self.vqmodel.encode(pixel_values, image_sizes, return_dict=True)
        encoded = []
        for codes in out.image_tokens:  # (h, w) codebook indices
            h, w = codes.shape
            ids = self.mapping.convert_img2bpe(codes).flatten().tolist()
            encoded.append((int(h), int(w), [int(i) for i in ids]))
        return encoded

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``(N, h * (w + 1))`` BPE image tokens (end-of-line tokens included) -> ``(N, 3, 8h, 8w)`` pixels."""
        rows = ids.view(-1, height, width + 1)
        return self.vqmodel.decode(self.mapping.convert_bpe2img(rows))


class JanusImageTokenizer:
    """Images <-> Janus VQ codes with a checkpoint's frozen ``JanusVQVAE`` (codes are NOT vocabulary ids).

    ``encode(pixel_values)`` gives, per image, ``(h, w, codes)``: the ``h * w`` codebook indices in raster
    order (``JanusVQVAE.encode(...).image_tokens``). ``decode(codes, h, w)`` is ``JanusVQVAE.decode``: pixels
    ``(N, 3, H, W)`` in the image processor's normalised range ([-1, 1] for Janus-Pro). ``h x w`` must be
    the model's ``num_patches`` grid, which is all its ``decode`` (and image-mode ``generate``) knows.
    """

    def __init__(self, vqmodel: Any) -> None:
        self.vqmodel = vqmodel.eval().requires_grad_(False)
        self.grid = tuple(int(n) for n in vqmodel.quantize.quant_state_dims)  # (h, w) decode expects

    @classmethod
    def from_pretrained(cls, path: str) -> JanusImageTokenizer:
        from transformers import JanusVQVAE

        config = _checkpoint_config(path, "janus")
        return cls(_load_vqmodel(path, JanusVQVAE(config.vq_config)))

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the codebook and encoder weights: cached encodings follow the VQ-VAE, not its path."""
        return _vq_fingerprint(self.vqmodel)

    @torch.no_grad()
    def encode(
        self, pixel_values: torch.Tensor, image_sizes: Sequence[Any] | None = None
    ) -> list[tuple[int, int, list[int]]]:
        """``image_sizes`` is unused (the processor pads every image to its square ``size``)."""
        param = next(self.vqmodel.parameters())
        out = self.vqmodel.encode(pixel_values.to(param.device, param.dtype), return_dict=True)
        n, _, h, w = out.quantized_last_hidden_state.shape
        codes = out.image_tokens.view(n, h * w)
        return [(int(h), int(w), [int(c) for c in row]) for row in codes.tolist()]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``(N, h * w)`` codes -> ``(N, 3, H, W)`` pixels."""
        if (height, width) != self.grid:
            raise ValueError(f"this VQ-VAE decodes a {self.grid} grid of codes, not ({height}, {width})")
        return self.vqmodel.decode(codes.view(-1, height * width))


#: ``config.model_type`` -> the image tokenizer of that family's checkpoints.
IMAGE_TOKENIZERS: dict[str, type] = {"emu3": Emu3ImageTokenizer, "janus": JanusImageTokenizer}


class ImageGridConstraint:
    """``prefix_allowed_tokens_fn`` for ``generate`` in image mode: an ``height`` x ``width`` token grid.

    After the prompt's last ``<|image token|>``: ``width`` visual tokens and an end-of-line token per row,
    then ``<eof><|image end|><eos>``, then padding (Emu3's documented generation recipe), so what comes out
    always decodes with ``decode_image_tokens(..., height, width)``.
    """

    def __init__(self, tokenizer: Any, height: int, width: int) -> None:
        vocab = tokenizer.get_vocab()
        self.visual = sorted(i for name, i in vocab.items() if name.startswith("<|visual token"))
        self.wrapper = tokenizer.convert_tokens_to_ids(tokenizer.image_wrapper_token)
        self.eol = vocab["<|extra_200|>"]
        ends = (tokenizer.eof_token, tokenizer.eoi_token, tokenizer.eos_token)
        self.ends = [tokenizer.convert_tokens_to_ids(token) for token in ends]
        self.pad = tokenizer.pad_token_id
        self.height, self.width = height, width

    def __call__(self, batch_id: int, input_ids: torch.Tensor) -> list[int]:
        where = torch.nonzero(input_ids == self.wrapper, as_tuple=True)[0]
        if not len(where):
            raise ValueError("image-mode generation needs a prompt ending with the image prompt")
        offset = input_ids.shape[0] - int(where[-1])  # 1 = the first image token
        grid = self.height * (self.width + 1)
        if offset > grid + len(self.ends):
            return [self.pad]
        if offset > grid:
            return [self.ends[offset - grid - 1]]
        return [self.eol] if offset % (self.width + 1) == 0 else self.visual
