"""Reward shaping applied to a rollout's scores before the advantages are computed.

Pure tensor functions: the RL modules add their output to the task score (DAPO's overlong shaping).
"""

from __future__ import annotations

import torch

__all__ = ["overlong_penalty"]


def overlong_penalty(
    lengths: torch.Tensor, max_length: int, buffer_length: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13), added to the score.

    With ``L_max = max_length`` and ``L_cache = buffer_length``::

        R_length(y) = 0                                  if |y| <= L_max - L_cache
                      ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
                      -1                                 if L_max < |y|

    times ``factor`` (1 in the paper). The middle branch reaches -1 at ``|y| = L_max``, so the three
    branches are one clamp of the middle one to ``[-1, 0]``. WHY: truncated answers get a penalty that grows
    smoothly with length instead of a cliff, so the policy is told "too long" without punishing sound
    reasoning that merely ran long.

    Args:
        lengths: ``(N,)`` response lengths in tokens (any numeric dtype).
        max_length: ``L_max``; ``0 < buffer_length <= max_length``.
        buffer_length: ``L_cache``, the length of the soft punishment interval.
        factor: scale of the penalty.

    Returns:
        ``(N,)`` float penalties in ``[-factor, 0]``.
    """
    if not 0 < buffer_length <= max_length:
        raise ValueError(f"need 0 < buffer_length ({buffer_length}) <= max_length ({max_length})")
    expected = max_length - buffer_length
    penalty = ((expected - lengths.float()) / buffer_length).clamp(min=-1.0, max=0.0)
    return factor * penalty
