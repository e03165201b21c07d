"""Dataset formatters: raw rows -> chat conversations, looked up by template name.

Importing this package registers the built-in text formatters (see :mod:`.text`).
"""

from aa_lightning.data.formatters import multimodal as _multimodal  # noqa: F401  (image/audio/video)
from aa_lightning.data.formatters import text as _text  # noqa: F401  (registers the built-ins)
from aa_lightning.data.formatters.base import SAMPLE_KINDS, BaseFormatter, Conversation, Meta
from aa_lightning.data.formatters.registry import (
    UnknownTemplateError,
    available_templates,
    get_formatter,
    get_formatter_class,
    register_template,
)

__all__ = [
    "SAMPLE_KINDS",
    "BaseFormatter",
    "Conversation",
    "Meta",
    "UnknownTemplateError",
    "available_templates",
    "get_formatter",
    "get_formatter_class",
    "register_template",
]
