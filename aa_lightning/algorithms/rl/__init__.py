"""On-policy RL (PPO, GRPO, Safe-RLHF, Online DPO, best-of-n), one job per file.

``rollout`` (the container and its pure helpers), ``metrics``, ``generation``, ``forwards``, ``scoring``,
``engine`` (optimizers; DeepSpeed behind ``deepspeed_adapter``), ``update`` (the one minibatch loop),
``module`` (:class:`OnlineRLModule`, composing them) and one file per algorithm.
"""

from aa_lightning.algorithms.rl.best_of_n import BestOfNModule
from aa_lightning.algorithms.rl.grpo import GRPOModule
from aa_lightning.algorithms.rl.module import OnlineRLModule
from aa_lightning.algorithms.rl.online_dpo import OnlineDPOModule
from aa_lightning.algorithms.rl.ppo import PPOModule
from aa_lightning.algorithms.rl.rollout import Rollout
from aa_lightning.algorithms.rl.safe_rlhf import SafeRLHFModule

__all__ = [
    "BestOfNModule",
    "GRPOModule",
    "OnlineDPOModule",
    "OnlineRLModule",
    "PPOModule",
    "Rollout",
    "SafeRLHFModule",
]
