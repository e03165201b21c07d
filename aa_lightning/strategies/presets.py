"""ZeRO config presets for ``DeepSpeedStrategy(config=...)`` / ``CPUDeepSpeedStrategy(config=...)``.

Each call returns a fresh dict because Lightning writes into the config it is given (batch size, gradient
accumulation, clipping, precision). Those keys are left out here on purpose: Lightning fills them from the
Trainer and refuses a config that already sets ``gradient_accumulation_steps``.
``zero_allow_untested_optimizer`` is always present because Lightning's ZeRO-3 inference path reads it
unconditionally (``KeyError`` otherwise).
"""

from __future__ import annotations

from typing import Any, Literal

OffloadDevice = Literal["none", "cpu", "nvme"]


def _offload(device: OffloadDevice, nvme_path: str, pin_memory: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {"device": device, "pin_memory": pin_memory}
    if device == "nvme":
        cfg["nvme_path"] = nvme_path
    return cfg


def zero_config(
    stage: Literal[0, 1, 2, 3] = 2,
    offload_optimizer: OffloadDevice = "none",
    offload_param: OffloadDevice = "none",
    nvme_path: str = "/local_nvme",
    pin_memory: bool = False,
    overlap_comm: bool = True,
    bucket_size: int = 200_000_000,
    gather_16bit_weights_on_model_save: bool = False,
) -> dict[str, Any]:
    """Build a DeepSpeed config with a ``zero_optimization`` block.

    ``pin_memory`` defaults to False since pinning needs a CUDA device; turn it on for GPU offload.
    ``offload_param`` only exists for stage 3 (DeepSpeed rejects it otherwise).
    """
    if offload_param != "none" and stage != 3:
        raise ValueError("Parameter offload needs ZeRO stage 3.")
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": bucket_size,
    }
    if stage in (1, 2):
        zero.update(allgather_partitions=True, allgather_bucket_size=bucket_size, reduce_scatter=True)
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=bucket_size,
            stage3_param_persistence_threshold=100_000,
            stage3_gather_16bit_weights_on_model_save=gather_16bit_weights_on_model_save,
        )
    if offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(offload_optimizer, nvme_path, pin_memory)
    if offload_param != "none":
        zero["offload_param"] = _offload(offload_param, nvme_path, pin_memory)
    return {"zero_allow_untested_optimizer": True, "zero_optimization": zero}


def zero2() -> dict[str, Any]:
    """ZeRO-2: optimizer state and gradients sharded, parameters replicated."""
    return zero_config(stage=2)


def zero2_offload() -> dict[str, Any]:
    """ZeRO-2 with optimizer state on CPU (DeepSpeedCPUAdam is JIT-built on first use)."""
    return zero_config(stage=2, offload_optimizer="cpu")


def zero3() -> dict[str, Any]:
    """ZeRO-3: parameters sharded too; build the model in ``configure_model`` so it is sharded at init."""
    return zero_config(stage=3)


def zero3_offload() -> dict[str, Any]:
    """ZeRO-3 with both optimizer state and parameters offloaded to CPU memory."""
    return zero_config(stage=3, offload_optimizer="cpu", offload_param="cpu")


PRESETS = {"zero2": zero2, "zero2_offload": zero2_offload, "zero3": zero3, "zero3_offload": zero3_offload}
