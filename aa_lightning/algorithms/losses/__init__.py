"""Loss functions for preference optimisation, reward/cost modelling and RL fine-tuning.

All functions are pure: tensors in, tensors out. Every loss is returned already reduced to a scalar,
together with detached per-example quantities that are worth logging. Shapes use ``B`` for batch size,
``T`` for the number of (shifted) token positions and ``G`` for a GRPO group size.

One module per family, all re-exported here so ``from aa_lightning.algorithms.losses import X`` is the one
import callers need:

* :mod:`.outputs`: the named tuples the losses return;
* :mod:`.pairwise`: (chosen, rejected) pair losses: DPO (+ hinge, IPO), SimPO, ORPO;
* :mod:`.dpo_variants`: the other DPO pair losses (robust, EXO, NCA, BCO, SPPO, AOT, APO, DiscoPOP);
* :mod:`.unpaired`: losses on single labelled responses: KTO;
* :mod:`.reward_model`: reward-model and cost-model losses;
* :mod:`.kl`: per-token KL estimators;
* :mod:`.advantages`: GAE and GRPO group-relative advantages;
* :mod:`.policy_gradient`: PPO / GRPO clipped objectives, PPO value loss, token aggregation;
* :mod:`.lagrangian`: Safe-RLHF's PPO-Lagrangian advantage and multiplier loss;
* :mod:`.shaping`: reward shaping added to RL scores (DAPO's overlong penalty).
"""

from __future__ import annotations

from aa_lightning.algorithms.losses.advantages import compute_gae, grpo_advantages
from aa_lightning.algorithms.losses.kl import kl_penalty
from aa_lightning.algorithms.losses.lagrangian import lagrange_multiplier_loss, lagrangian_advantage
from aa_lightning.algorithms.losses.outputs import (
    CostModelLossOutput,
    GRPOLossOutput,
    KTOLossOutput,
    ORPOLossOutput,
    PolicyLossOutput,
    PreferenceLossOutput,
    RewardLossOutput,
    ValueLossOutput,
)
from aa_lightning.algorithms.losses.pairwise import dpo_loss, orpo_loss, simpo_loss
from aa_lightning.algorithms.losses.policy_gradient import (
    aggregate_token_loss,
    grpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
)
from aa_lightning.algorithms.losses.reward_model import cost_model_loss, reward_pairwise_loss
from aa_lightning.algorithms.losses.shaping import overlong_penalty
from aa_lightning.algorithms.losses.unpaired import kto_kl_estimate, kto_loss

__all__ = [
    "CostModelLossOutput",
    "GRPOLossOutput",
    "KTOLossOutput",
    "ORPOLossOutput",
    "PolicyLossOutput",
    "PreferenceLossOutput",
    "RewardLossOutput",
    "ValueLossOutput",
    "aggregate_token_loss",
    "compute_gae",
    "cost_model_loss",
    "dpo_loss",
    "grpo_advantages",
    "grpo_loss",
    "kl_penalty",
    "kto_kl_estimate",
    "kto_loss",
    "lagrange_multiplier_loss",
    "lagrangian_advantage",
    "orpo_loss",
    "overlong_penalty",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reward_pairwise_loss",
    "simpo_loss",
]
