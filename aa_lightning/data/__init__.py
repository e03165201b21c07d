"""Data layer: formatters, chat templating, encoding, collators and one DataModule per modality."""

from aa_lightning.data.datamodule import ConversationDataModule, TextToTextDataModule
from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters import BaseFormatter, available_templates, get_formatter, register_template
from aa_lightning.data.sources import DataSpec

__all__ = [
    "BaseFormatter",
    "ConversationDataModule",
    "DataFormatError",
    "DataSpec",
    "TextToTextDataModule",
    "available_templates",
    "get_formatter",
    "register_template",
]
