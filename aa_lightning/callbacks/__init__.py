"""Callbacks: Hugging Face export, sample generation, predictions, rollout media, the end-of-fit summary."""

from aa_lightning.callbacks.hf_export import HFExportCallback
from aa_lightning.callbacks.media_logging import RolloutMediaLogger
from aa_lightning.callbacks.predictions import JsonlPredictionWriter
from aa_lightning.callbacks.samples import SampleGenerationCallback
from aa_lightning.callbacks.summary import RunSummary

__all__ = [
    "HFExportCallback",
    "JsonlPredictionWriter",
    "RolloutMediaLogger",
    "RunSummary",
    "SampleGenerationCallback",
]
