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
from aa_lightning.models.token_outputs import register_token_outputs

__all__ = [
    "IMAGE_TOKENIZERS",
    "Emu3ImageOutputs",
    "Emu3ImageTokenizer",
    "ImageGridConstraint",
    "JanusImageTokenizer",
    "image_grids",
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
    register_token_outputs("emu3", Emu3ImageOutputs, override=True)
    _skip_loaded_modules_in_vqvae_init()


def _skip_loaded_modules_in_vqvae_init() -> None:
    """``Emu3VQVAE._init_weights`` reads ``weight``'s fan-in before any guarded init call.

    Under ZeRO-3 ``from_pretrained`` runs ``initialize_weights`` after loading, gathering only the parameters
    the checkpoint lacked; a loaded convolution's weight is then a 0-element shard and that read raises
    ("fan in and fan out can not be computed"), so an Emu3 checkpoint could not be loaded under ZeRO-3 at all.
    A module whose own parameters were all loaded has nothing to initialise (every init call would be skipped
    anyway): skip it before the read. Idempotent; other modules keep transformers' own initialisation.
    """
    from transformers.models.emu3 import modeling_emu3

    cls = modeling_emu3.Emu3VQVAE
    original = cls._init_weights
    if getattr(original, "_aa_skips_loaded", False):
        return

    def _init_weights(self: Any, module: torch.nn.Module) -> None:
        params = list(module.parameters(recurse=False))
        if params and all(getattr(p, "_is_hf_initialized", False) for p in params):
            return
        original(self, module)

    _init_weights._aa_skips_loaded = True  # type: ignore[attr-defined]
    cls._init_weights = _init_weights


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
    """``prefix_allowed_tokens_fn`` for ``generate`` in image mode: a ``height`` x ``width`` token grid.

    After the prompt's last ``<|image token|>``: ``width`` visual tokens and an end-of-line token per row,
    then ``<eof><|image end|><eos>``, then padding (Emu3's documented generation recipe), so what comes out
    always decodes with ``decode_image_tokens(..., height, width)``. ``grids`` gives one ``(height, width)``
    per row of the generated batch instead (rows of one batch may differ).
    """

    def __init__(
        self,
        tokenizer: Any,
        height: int = 0,
        width: int = 0,
        grids: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        vocab = tokenizer.get_vocab()
        self.visual = sorted(i for name, i in vocab.items() if name.startswith("<|visual token"))
        self.wrapper = tokenizer.convert_tokens_to_ids(tokenizer.image_wrapper_token)
        self.eol = vocab["<|extra_200|>"]
        ends = (tokenizer.eof_token, tokenizer.eoi_token, tokenizer.eos_token)
        self.ends = [tokenizer.convert_tokens_to_ids(token) for token in ends]
        self.pad = tokenizer.pad_token_id
        self.height, self.width = height, width
        self.grids = list(grids) if grids is not None else None
        if self.grids is None and not (height > 0 and width > 0):
            raise ValueError("ImageGridConstraint needs height and width (or one grid per row)")

    def new_tokens(self, height: int, width: int) -> int:
        """Tokens generated for one image: the grid and the three end tokens."""
        return height * (width + 1) + len(self.ends)

    def __call__(self, batch_id: int, input_ids: torch.Tensor) -> list[int]:
        height, width = self.grids[batch_id] if self.grids is not None else (self.height, self.width)
        where = torch.nonzero(input_ids == self.wrapper, as_tuple=True)[0]
        if not len(where):
            raise ValueError("image-mode generation needs a prompt ending with the image prompt")
        offset = input_ids.shape[0] - int(where[-1])  # 1 = the first image token
        grid = height * (width + 1)
        if offset > grid + len(self.ends):
            return [self.pad]
        if offset > grid:
            return [self.ends[offset - grid - 1]]
        return [self.eol] if offset % (width + 1) == 0 else self.visual


def image_grids(metas: Sequence[dict[str, Any]]) -> list[tuple[int, int]] | None:
    """Each row's ``(height, width)`` token grid from its meta (the image-token datamodule writes it), or
    ``None`` when no row asks for an image; a batch mixing image and text prompts is refused."""
    grids = [(m.get("height"), m.get("width")) for m in metas]
    asks = [h is not None and w is not None for h, w in grids]
    if not any(asks):
        return None
    if not all(asks):
        rows = [i for i, a in enumerate(asks) if not a][:5]
        raise ValueError(
            f"a prompt batch mixes image prompts with prompts whose meta has no height/width (rows {rows}): "
            "generate image and text prompts in separate batches"
        )
    return [(int(h), int(w)) for h, w in grids]


class Emu3ImageOutputs:
    """The token-output codec of Emu3 (:mod:`aa_lightning.models.token_outputs`): rows whose meta carries a
    token grid are sampled under :class:`ImageGridConstraint` and decoded by the model's own VQ-VAE.

    The sampled distribution is the model's, renormalised over the tokens the grid allows; the RL log-probs
    stay the unconstrained ones (as with ``top_k``): at the forced end-of-line and end tokens this only
    pushes up tokens the constraint would force anyway.
    """

    def __init__(self, model: Any, tokenizer: Any, processor: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor

    def prompt_inputs(self, texts: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        """Image-generation prompts for plain texts (sample callbacks), left-padded, with their metas.

        The grid is the processor's square image area, bounded by its image processor's ``max_pixels`` (the
        checkpoint's native size: 90 x 90 tokens for Emu3-Gen, 4 x 4 for ``tiny-emu3``).
        """
        area = int(getattr(self.processor, "image_area", 518400))
        area = min(area, int(getattr(self.processor.image_processor, "max_pixels", area)))
        factor = int(getattr(self.processor, "downsample_ratio", 8))
        height, width = self.processor.calculate_generate_size("1:1", area, factor)
        tok = self.tokenizer
        prompts = [
            f"{tok.bos_token or ''}{t}{tok.boi_token}{height}*{width}{tok.image_wrapper_token}" for t in texts
        ]
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            inputs = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = side
        metas = [{"prompt": t, "height": int(height), "width": int(width)} for t in texts]
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}, metas

    def generation_overrides(self, metas: Sequence[dict[str, Any]]) -> dict[str, Any]:
        grids = image_grids(metas)
        if grids is None:
            return {}
        constraint = ImageGridConstraint(self.tokenizer, grids=grids)
        return {
            "prefix_allowed_tokens_fn": constraint,
            "max_new_tokens": max(constraint.new_tokens(h, w) for h, w in grids),
        }

    @torch.no_grad()
    def decode(self, response_ids: torch.Tensor, metas: Sequence[dict[str, Any]]) -> list[Any]:
        """One ``PIL.Image`` per row (the row's grid, end-of-line tokens dropped by the vocabulary map)."""
        grids = image_grids(metas)
        if grids is None:
            return self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        family = self.model.model
        images = []
        for row, (height, width) in zip(response_ids, grids):
            grid = row[: height * (width + 1)].view(1, height, width + 1)
            codes = family.vocabulary_mapping.convert_bpe2img(grid)
            pixels = family.vqmodel.decode(codes)  # (1, 3, H, W) in the processor's normalised range
            images.append(self.to_image(pixels))
        return images

    def to_image(self, pixels: torch.Tensor) -> Any:
        """Pixels in the image processor's normalised space -> ``PIL.Image`` (its own ``postprocess``)."""
        if self.processor is None or not hasattr(self.processor, "postprocess"):
            raise ValueError(
                "decoding Emu3 image tokens needs the checkpoint's processor (its image statistics)"
            )
        return self.processor.postprocess(pixels.float(), return_tensors="PIL.Image.Image")["pixel_values"][0]
