"""One LightningModule per algorithm; losses are pure functions in :mod:`.losses`."""

from aa_lightning.algorithms.base import AlignModule
from aa_lightning.algorithms.config import GenerationConfig, LoraConfig, OptimConfig
from aa_lightning.algorithms.sft import SFTModule

__all__ = ["AlignModule", "GenerationConfig", "LoraConfig", "OptimConfig", "SFTModule"]
