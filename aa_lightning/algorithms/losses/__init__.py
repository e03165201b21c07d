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
* :mod:`.advantages`: GAE, GRPO group-relative, RLOO, REINFORCE++ and ReMax advantages;
* :mod:`.policy_gradient`: PPO / GRPO / GSPO / CISPO objectives, PPO value loss, token aggregation;
* :mod:`.lagrangian`: Safe-RLHF's PPO-Lagrangian advantage and multiplier loss;
* :mod:`.shaping`: reward shaping added to RL scores (DAPO's overlong penalty).
"""

from __future__ import annotations

from aa_lightning.algorithms.losses.advantages import (
    compute_gae,
    discounted_returns,
    global_normalize,
    grpo_advantages,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
)
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
    cispo_token_loss,
    clipped_token_loss,
    grpo_loss,
    gspo_token_loss,
    ppo_policy_loss,
    ppo_value_loss,
    truncated_importance_weights,
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
    "cispo_token_loss",
    "clipped_token_loss",
    "compute_gae",
    "cost_model_loss",
    "discounted_returns",
    "dpo_loss",
    "global_normalize",
    "grpo_advantages",
    "grpo_loss",
    "gspo_token_loss",
    "kl_penalty",
    "kto_kl_estimate",
    "kto_loss",
    "lagrange_multiplier_loss",
    "lagrangian_advantage",
    "orpo_loss",
    "overlong_penalty",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reinforce_pp_advantages",
    "remax_advantages",
    "reward_pairwise_loss",
    "rloo_advantages",
    "simpo_loss",
    "truncated_importance_weights",
]
