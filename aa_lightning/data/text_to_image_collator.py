"""Batches of prompts and images for text-to-image diffusion models (the contract of :mod:`aa_lightning.batch`).

Keys: ``input_ids``/``attention_mask`` ``(N, max_length)`` (the prompt tokens, padded as the tokenizer pads
with ``padding="max_length"``), ``pixel_values`` ``(N, 3, R, R)`` float32 in [-1, 1] and ``noise_seed``
``(N,)`` int64, plus ``extra`` and ``meta``; no ``labels`` (the diffusion loss needs no token targets).
Preference batches hold the ``B`` chosen rows, then the ``B`` rejected rows, with the same prompt tokens and
the same ``noise_seed`` in rows ``i`` and ``i + B``: the two images of a pair get the same noise and
timestep, so the difference of their denoising errors measures the preference, not the draw.

The seeds are a hash of (``seed_everything``'s seed, sample index, epoch) (:mod:`aa_lightning.data.noise_seeds`):
the same on every rank, worker and batch composition, and after a resume.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from aa_lightning.batch import EXTRA, META, NOISE_SEED, SAMPLE_INDEX
from aa_lightning.data.collators import meta_tensors, pad_sequences
from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.media import load_image, media_label
from aa_lightning.data.noise_seeds import row_noise_seeds

__all__ = ["IMAGE_SIDES", "TextToImageCollator", "image_tensor"]

#: Per kind, the batch-meta names of a sample's images, in the order they are stored (``meta["images"]``).
IMAGE_SIDES = {"supervised": ("image",), "preference": ("chosen_image", "rejected_image"), "prompt_only": ()}


def image_tensor(image: Any, resolution: int, flip: bool = False) -> torch.Tensor:
    """``(3, resolution, resolution)`` float32 in [-1, 1]: the shorter side resized to ``resolution``
    (bilinear), center-cropped, optionally flipped left-right; the preprocessing of diffusers' and
    Diffusion-DPO's training scripts (``Resize``, ``CenterCrop``, ``ToTensor``, ``Normalize(0.5, 0.5)``).
    torchvision is imported here, not at module level: the text-only environments (the vLLM one) lack it."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF  # noqa: N812

    image = TF.resize(image.convert("RGB"), resolution, interpolation=InterpolationMode.BILINEAR)
    image = TF.center_crop(image, resolution)
    if flip:
        image = TF.hflip(image)
    return TF.pil_to_tensor(image).to(torch.float32).div(127.5).sub(1.0)


class TextToImageCollator:
    """Encoded text-to-image samples -> a batch (module doc). ``random_flip`` flips each sample's images
    with probability 0.5, both images of a pair alike (a flip drawn per pair, so the pair stays a pair).

    A subclass for another media kind says where the references are (``meta_key``), the batch key of the
    tensors (``batch_key``), the batch-meta names (``sides``) and how one reference becomes a tensor
    (:meth:`media_tensor`): :class:`~aa_lightning.data.text_to_video.TextToVideoCollator`.
    """

    meta_key = "images"
    batch_key = "pixel_values"
    sides = IMAGE_SIDES

    def __init__(
        self,
        kind: str,
        pad_token_id: int,
        max_length: int,
        resolution: int,
        random_flip: bool = False,
        padding_side: str = "right",
    ) -> None:
        if kind not in self.sides:
            raise ValueError(f"unknown sample kind {kind!r}")
        self.kind = kind
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.resolution = resolution
        self.random_flip = random_flip
        self.padding_side = padding_side

    def _tokens(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        # every row holds at most max_length tokens (truncated when encoded), so padding to a multiple of
        # max_length pads to exactly max_length, as padding="max_length" does
        side, length = self.padding_side, self.max_length
        return {
            "input_ids": pad_sequences(ids, self.pad_token_id, side, length),
            "attention_mask": pad_sequences([[1] * len(row) for row in ids], 0, side, length),
        }

    def media_tensor(self, ref: Mapping[str, Any], flip: bool) -> torch.Tensor:
        """One image reference -> ``(3, R, R)`` in [-1, 1]."""
        return image_tensor(load_image(ref), self.resolution, flip)

    def _pixels(self, samples: list[dict[str, Any]], metas: list[dict[str, Any]]) -> torch.Tensor:
        flips = (torch.rand(len(samples)) < 0.5).tolist() if self.random_flip else [False] * len(samples)
        tensors = []
        for side in range(len(self.sides[self.kind])):  # all chosen media, then all rejected ones
            for sample, meta, flip in zip(samples, metas, flips):
                try:
                    tensors.append(self.media_tensor(meta[self.meta_key][side], flip))
                except DataFormatError as err:  # decoded when prepared: the file changed since
                    raise err.with_location(source=meta.get("_source"), row=sample.get("_row")) from None
        return torch.stack(tensors)

    def public_meta(self, sample: Mapping[str, Any], meta: Mapping[str, Any], kind: str) -> dict[str, Any]:
        """What ``batch["meta"]`` shows of a sample: the prompt, the media paths, the formatter's meta."""
        shown = {key: value for key, value in meta.items() if key not in (self.meta_key, "_source")}
        shown["prompt"] = sample["prompt"]
        for name, ref in zip(self.sides[kind], meta.get(self.meta_key, ())):
            shown[name] = media_label(ref)
        return shown

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        metas = [json.loads(s["meta"]) if isinstance(s["meta"], str) else s["meta"] for s in samples]
        ids = [list(s["input_ids"]) for s in samples]
        pairs = self.kind == "preference"
        batch: dict[str, Any] = self._tokens(ids + ids if pairs else ids)
        if self.kind != "prompt_only":
            seeds = row_noise_seeds([s.get(SAMPLE_INDEX, i) for i, s in enumerate(samples)])
            batch[self.batch_key] = self._pixels(samples, metas)
            batch[NOISE_SEED] = torch.cat([seeds, seeds]) if pairs else seeds
        shown = [self.public_meta(s, m, self.kind) for s, m in zip(samples, metas)]
        batch[EXTRA] = meta_tensors(shown)
        if SAMPLE_INDEX in samples[0]:
            batch[EXTRA][SAMPLE_INDEX] = torch.tensor([s[SAMPLE_INDEX] for s in samples], dtype=torch.long)
        batch[META] = shown
        return batch
