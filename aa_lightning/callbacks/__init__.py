"""Callbacks: Hugging Face export and sample generation."""

from aa_lightning.callbacks.hf_export import HFExportCallback
from aa_lightning.callbacks.media_logging import RolloutMediaLogger
from aa_lightning.callbacks.predictions import JsonlPredictionWriter
from aa_lightning.callbacks.samples import SampleGenerationCallback

__all__ = ["HFExportCallback", "JsonlPredictionWriter", "RolloutMediaLogger", "SampleGenerationCallback"]
