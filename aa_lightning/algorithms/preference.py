"""Deprecated import location of the preference family; each part now has its own module.

- :mod:`.step_stats`: ``StageMeans``, ``StepStatsModule``, ``pair_stats``, ``PREFERENCE_METRICS``
- :mod:`.policy`: ``PolicyModule``, ``ReferencePolicyModule``
- :mod:`.reference_cache`: precomputed reference log-probs and their fingerprints
- :mod:`.dpo`, :mod:`.simpo`, :mod:`.orpo`: the methods; :mod:`.reference_free`: the deprecated alias
- :mod:`aa_lightning.batch`: ``split_pairs``, ``IGNORE_INDEX``
"""

from aa_lightning.algorithms.dpo import DPOModule
from aa_lightning.algorithms.orpo import ORPOModule
from aa_lightning.algorithms.policy import PolicyModule, ReferencePolicyModule
from aa_lightning.algorithms.reference_cache import dataset_fingerprint, model_identity
from aa_lightning.algorithms.reference_free import ReferenceFreeModule
from aa_lightning.algorithms.simpo import SimPOModule
from aa_lightning.algorithms.step_stats import PREFERENCE_METRICS, StageMeans, StepStatsModule, pair_stats
from aa_lightning.batch import IGNORE_INDEX, split_pairs

__all__ = [
    "DPOModule",
    "IGNORE_INDEX",
    "ORPOModule",
    "PREFERENCE_METRICS",
    "PolicyModule",
    "ReferenceFreeModule",
    "ReferencePolicyModule",
    "SimPOModule",
    "StageMeans",
    "StepStatsModule",
    "dataset_fingerprint",
    "model_identity",
    "pair_stats",
    "split_pairs",
]
