"""Training strategies. Importing this package registers the ``deepspeed_cpu*`` strategy names.

Import it before deepspeed is imported anywhere: on a machine without CUDA it sets ``DS_ACCELERATOR=cpu``
(see :mod:`aa_lightning.strategies.deepspeed_cpu`).
"""

from aa_lightning.strategies.deepspeed_cpu import (
    CPUDeepSpeedStrategy,
    configure_deepspeed_env,
    register_cpu_deepspeed_strategies,
)
from aa_lightning.strategies.presets import PRESETS, zero_config

register_cpu_deepspeed_strategies()

__all__ = [
    "PRESETS",
    "CPUDeepSpeedStrategy",
    "configure_deepspeed_env",
    "register_cpu_deepspeed_strategies",
    "zero_config",
]
