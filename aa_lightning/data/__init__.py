"""Data layer: formatters, chat templating, encoding, collators and one DataModule per modality."""

from aa_lightning.data.audio import TextAudioToTextDataModule
from aa_lightning.data.datamodule import ConversationDataModule, TextToTextDataModule
from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters import BaseFormatter, available_templates, get_formatter, register_template
from aa_lightning.data.image import TextImageToTextDataModule
from aa_lightning.data.multimodal import MultimodalDataModule
from aa_lightning.data.sources import DataSpec
from aa_lightning.data.text_to_audio import TextToAudioDataModule
from aa_lightning.data.text_to_image import TextToImageDataModule
from aa_lightning.data.text_to_image_tokens import TextToImageTokensDataModule
from aa_lightning.data.text_to_video import TextToVideoDataModule
from aa_lightning.data.video import TextVideoToTextDataModule

__all__ = [
    "BaseFormatter",
    "ConversationDataModule",
    "DataFormatError",
    "DataSpec",
    "MultimodalDataModule",
    "TextAudioToTextDataModule",
    "TextImageToTextDataModule",
    "TextToAudioDataModule",
    "TextToImageDataModule",
    "TextToImageTokensDataModule",
    "TextToVideoDataModule",
    "TextToTextDataModule",
    "TextVideoToTextDataModule",
    "available_templates",
    "get_formatter",
    "register_template",
]
