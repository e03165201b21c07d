"""Text + image -> text (ti2t): conversations with images for LLaVA, Qwen2-VL and other VLM processors."""

from __future__ import annotations

from aa_lightning.data.multimodal import MultimodalDataModule

__all__ = ["TextImageToTextDataModule"]


class TextImageToTextDataModule(MultimodalDataModule):
    """Image + text rows (paths relative to the data file, bytes, or PIL images in a dataset column).

    Images are decoded to RGB in the collator; the processor resizes them and expands each image
    placeholder. Takes every argument of :class:`~aa_lightning.data.multimodal.MultimodalDataModule`.
    """

    modalities = ("images",)
