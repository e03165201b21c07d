"""One LightningModule per algorithm; losses are pure functions in :mod:`.losses`."""

from aa_lightning.algorithms.base import AlignModule
from aa_lightning.algorithms.config import GenerationConfig, LoraConfig, OptimConfig
from aa_lightning.algorithms.cpo import CPOModule
from aa_lightning.algorithms.dpo import DPOModule
from aa_lightning.algorithms.kto import KTOModule
from aa_lightning.algorithms.orpo import ORPOModule
from aa_lightning.algorithms.reference_free import ReferenceFreeModule
from aa_lightning.algorithms.reward import CostModule, RewardModule
from aa_lightning.algorithms.rl import BestOfNModule, GRPOModule, OnlineDPOModule, PPOModule, SafeRLHFModule
from aa_lightning.algorithms.sft import SFTModule
from aa_lightning.algorithms.simpo import SimPOModule

__all__ = [
    "AlignModule",
    "BestOfNModule",
    "CostModule",
    "DPOModule",
    "GRPOModule",
    "GenerationConfig",
    "KTOModule",
    "LoraConfig",
    "ORPOModule",
    "OnlineDPOModule",
    "OptimConfig",
    "PPOModule",
    "ReferenceFreeModule",
    "RewardModule",
    "SafeRLHFModule",
    "SFTModule",
    "SimPOModule",
    "CPOModule",
]
