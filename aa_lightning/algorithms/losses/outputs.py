"""What every loss returns: a scalar loss plus the detached per-example quantities worth logging.

Kept in one place so that losses of one family share a container (every DPO-style pair loss returns a
:class:`PreferenceLossOutput`) and the algorithms that log them import one module. Shapes: ``B`` batch size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class PreferenceLossOutput(NamedTuple):
    loss: torch.Tensor  # () mean over the batch
    chosen_rewards: torch.Tensor  # (B,) detached implicit reward of the chosen response
    rejected_rewards: torch.Tensor  # (B,) detached implicit reward of the rejected response
    losses: torch.Tensor  # (B,) per-example losses (not detached)


class ORPOLossOutput(NamedTuple):
    loss: torch.Tensor  # () nll_loss + lambda_ * or_loss
    nll_loss: torch.Tensor  # () chosen NLL term
    or_loss: torch.Tensor  # () mean odds-ratio term (before the lambda_ weight)
    log_odds_ratio: torch.Tensor  # (B,) detached log odds(chosen) - log odds(rejected)
    chosen_rewards: torch.Tensor  # (B,) detached lambda_ * chosen mean log-prob
    rejected_rewards: torch.Tensor  # (B,) detached lambda_ * rejected mean log-prob


class KTOLossOutput(NamedTuple):
    loss: torch.Tensor  # () mean over all examples
    losses: torch.Tensor  # (B,) per-example weighted losses
    rewards: torch.Tensor  # (B,) detached beta * (policy - ref) log-ratio
    kl: torch.Tensor  # () the reference point z0 actually used


class RewardLossOutput(NamedTuple):
    loss: torch.Tensor  # ()
    accuracy: torch.Tensor  # () fraction with chosen > rejected
    chosen_scores: torch.Tensor  # (B,) detached
    rejected_scores: torch.Tensor  # (B,) detached


class CostModelLossOutput(NamedTuple):
    loss: torch.Tensor  # ()
    accuracy: torch.Tensor  # () fraction with cost(unsafer) > cost(safer)
    sign_accuracy: torch.Tensor  # () fraction of the 2B costs whose sign matches the safety label
    safer_costs: torch.Tensor  # (B,) detached
    unsafer_costs: torch.Tensor  # (B,) detached


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # ()
    clip_fraction: torch.Tensor  # () masked fraction of tokens where the clipped branch is active
    approx_kl: torch.Tensor  # () masked mean of 0.5 * (logp - old_logp)^2 (k2 estimator)


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor  # ()
    clip_fraction: torch.Tensor  # () masked fraction of tokens where the clipped value loss is larger


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor  # ()
    clip_fraction: torch.Tensor  # () masked fraction of tokens where the clipped branch is active
    kl: torch.Tensor  # () masked mean of the k3 KL to the reference (0 without reference)
