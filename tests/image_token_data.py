"""The text-to-image rows of the tests as image-token batches (Emu3, Janus): one builder for every test file."""

from __future__ import annotations

import os
from typing import Any

from aa_lightning.data import DataSpec, TextToImageTokensDataModule
from aa_lightning.testing.tiny_image_generation import TINY_EMU3_RESOLUTION

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2I = os.path.join(REPO, "configs", "data", "media", "text_to_image")


def image_token_datamodule(
    model: str,
    name: str,
    template: str,
    kind: str,
    batch_size: int = 3,
    split: str | None = None,
    **kwargs: Any,
) -> TextToImageTokensDataModule:
    """``configs/data/media/text_to_image/<name>`` for ``model`` as ``split`` (default: prompt-only rows as
    the predict split, the others as train)."""
    spec = DataSpec(os.path.join(T2I, name), template)
    split = split or ("predict" if kind == "prompt_only" else "train")
    kwargs.setdefault("resolution", TINY_EMU3_RESOLUTION)
    return TextToImageTokensDataModule(
        model, kind=kind, batch_size=batch_size, shuffle=False, **{split: spec}, **kwargs
    )


def first_batch(dm: TextToImageTokensDataModule, split: str = "train") -> dict[str, Any]:
    dm.setup("fit" if split == "train" else "predict")
    loader = dm.train_dataloader() if split == "train" else dm.predict_dataloader()
    return next(iter(loader))
