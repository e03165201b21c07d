"""Model layer: registry, loading, score model, text-to-image, -video and -audio diffusion and model aliases.

The random tiny models that the ``tiny-*`` aliases build are test fixtures, in :mod:`aa_lightning.testing`.
"""

from aa_lightning.models.aliases import resolve_model_path
from aa_lightning.models.audio_diffusion import TextToAudioDiffusion
from aa_lightning.models.diffusion import (
    LatentDiffusion,
    OutputScores,
    TextToImageDiffusion,
    TextToVideoDiffusion,
)
from aa_lightning.models.image_tokens import Emu3ImageTokenizer, register_image_token_models
from aa_lightning.models.loading import load_pretrained_models, load_tokenizer_and_processor
from aa_lightning.models.registry import MODEL_REGISTRY, register_model, resolve_model_class
from aa_lightning.models.score_model import ScoreModel, ScoreModelOutput

register_image_token_models()

__all__ = [
    "LatentDiffusion",
    "MODEL_REGISTRY",
    "Emu3ImageTokenizer",
    "OutputScores",
    "ScoreModel",
    "ScoreModelOutput",
    "TextToAudioDiffusion",
    "TextToImageDiffusion",
    "TextToVideoDiffusion",
    "load_pretrained_models",
    "load_tokenizer_and_processor",
    "register_model",
    "resolve_model_class",
    "resolve_model_path",
]
