"""Dataset formatters: raw rows -> chat conversations, looked up by template name.

Importing this package registers every built-in formatter: each module below holds one dataset family and
registers its classes with ``@register_template`` when imported, so a module missing here is a template
name missing from configs. Text: :mod:`.instruction`, :mod:`.conversation`, :mod:`.preference`,
:mod:`.safety`, :mod:`.math_problems` (on the shared :mod:`.chat` parsing). Image/audio/video:
:mod:`.mllm`, :mod:`.rlaif_v`, :mod:`.speech`, :mod:`.align_anything_media` (on :mod:`.multimodal_chat`).
Text to image (a prompt and its generated images): :mod:`.text_to_image`; text to video: :mod:`.text_to_video`;
text to audio: :mod:`.text_to_audio`.
Image understanding and generation mixed in one file (align-anything's Any2Any): :mod:`.any_to_any`.
"""

from aa_lightning.data.formatters import (  # noqa: F401  (imported to register the built-ins)
    align_anything_media,
    any_to_any,
    conversation,
    instruction,
    math_problems,
    mllm,
    preference,
    rlaif_v,
    safety,
    speech,
    text_to_audio,
    text_to_image,
    text_to_video,
)
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
