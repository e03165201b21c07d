"""Rollout engines: what samples the RL modules' responses, chosen by the ``rollout_engine`` config key.

``hf`` (default): the policy's own KV-cached ``generate``. ``vllm``: a colocated vLLM engine fed the trained
weights after every optimizer update (``pip install aa-lightning[vllm]``; :mod:`.vllm_engine`). Both answer
the one contract of :mod:`.base`; register another with :func:`register_rollout_engine`.
"""

from aa_lightning.algorithms.rl.rollout_engines import hf, vllm_engine  # noqa: F401  (register the engines)
from aa_lightning.algorithms.rl.rollout_engines.base import (
    EngineCompletions,
    EngineRequest,
    FinishReason,
    RolloutEngine,
    SamplingSettings,
)
from aa_lightning.algorithms.rl.rollout_engines.registry import (
    build_rollout_engine,
    register_rollout_engine,
    rollout_engine_names,
)

__all__ = [
    "EngineCompletions",
    "EngineRequest",
    "FinishReason",
    "RolloutEngine",
    "SamplingSettings",
    "build_rollout_engine",
    "register_rollout_engine",
    "rollout_engine_names",
]
