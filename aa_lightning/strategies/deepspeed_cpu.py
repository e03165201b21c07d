"""DeepSpeed ZeRO on CPU (gloo) as a Lightning strategy.

Lightning's ``DeepSpeedStrategy`` hard-refuses anything but CUDA, yet DeepSpeed itself runs ZeRO-2/3 on CPU
when ``DS_ACCELERATOR=cpu``. ``CPUDeepSpeedStrategy`` lifts the three CUDA-only spots so the same training code
(and the same sharded ``configure_model``) can be exercised on a laptop or in CI; on a CUDA accelerator it
behaves exactly like ``DeepSpeedStrategy``.

Importing this module has two environment side effects, both ``setdefault`` so explicit settings win:

* ``DS_ACCELERATOR=cpu`` when no CUDA device is visible. DeepSpeed picks its accelerator once, on first use,
  so it has to be set before ``deepspeed`` is imported anywhere; child processes started by Lightning's
  launcher inherit it.
* ``TORCH_EXTENSIONS_DIR`` to ``~/.cache/aa_lightning/torch_extensions/<py>_<cpu|cuXY>``. On CPU DeepSpeed
  JIT-builds a shared-memory communication op on the first run (about two minutes); one fixed cache makes
  every later run (and every test) reuse it.

Registered names (usable as ``trainer.strategy: <name>`` in YAML once ``aa_lightning.strategies`` is
imported): ``deepspeed_cpu``, ``deepspeed_cpu_stage_1``, ``deepspeed_cpu_stage_2``,
``deepspeed_cpu_stage_2_offload``, ``deepspeed_cpu_stage_3``, ``deepspeed_cpu_stage_3_offload``.
Without the import, use the class path form::

    trainer:
      accelerator: cpu
      strategy:
        class_path: aa_lightning.strategies.CPUDeepSpeedStrategy
        init_args: {stage: 3}
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch


def _extensions_dir() -> str:
    """Per python/CUDA flavour so CPU and CUDA builds of the same op never overwrite each other."""
    flavour = (
        f"cu{torch.version.cuda.replace('.', '')}"
        if torch.cuda.is_available() and torch.version.cuda
        else "cpu"
    )
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_{flavour}"
    return str(Path.home() / ".cache" / "aa_lightning" / "torch_extensions" / tag)


def configure_deepspeed_env() -> None:
    """Set the env vars DeepSpeed reads at import / first use; a no-op for anything already set."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", _extensions_dir())


configure_deepspeed_env()

# Lightning's deepspeed modules import ``deepspeed`` lazily, but keep them after the env setup regardless.
from lightning.fabric.strategies import _StrategyRegistry  # noqa: E402
from lightning.fabric.utilities.seed import reset_seed  # noqa: E402
from lightning.pytorch.accelerators.cpu import CPUAccelerator  # noqa: E402
from lightning.pytorch.strategies.ddp import DDPStrategy  # noqa: E402
from lightning.pytorch.strategies.deepspeed import DeepSpeedStrategy  # noqa: E402

from aa_lightning.checkpoint_io import AtomicDeepSpeedCheckpoints  # noqa: E402


class CPUDeepSpeedStrategy(AtomicDeepSpeedCheckpoints, DeepSpeedStrategy):
    """``DeepSpeedStrategy`` that also accepts ``CPUAccelerator`` (gloo backend, DeepSpeed's CPU accelerator).

    Only the CUDA-only checks are bypassed, and only when the accelerator is a CPU one; everything else
    (ZeRO-3 ``deepspeed.zero.Init`` around ``configure_model``, manual optimization) is inherited unchanged,
    except that checkpoint directories are written atomically (:class:`AtomicDeepSpeedCheckpoints`), on GPUs
    too, and that a loss is divided by the accumulation steps once, not twice (:meth:`backward`).
    """

    strategy_name = "deepspeed_cpu"

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Lightning already divides each micro-batch's loss by ``accumulate_grad_batches``; DeepSpeed's engine
        would divide it again (``scale_wrt_gas``), so every gradient under accumulation came out ``k`` times
        too small (for every loss: clipping and ``train/grad_norm`` saw it even where Adam hid it). Manual
        optimization runs with ``accumulate_grad_batches == 1``, where the flag changes nothing."""
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    @property
    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        """Skip the parent's "CUDA only" check on CPU; DDPStrategy's environment setup still runs."""
        if not self._on_cpu:
            super().setup_environment()
            return
        from deepspeed.accelerator import get_accelerator

        ds_device = get_accelerator().device_name()
        if ds_device != "cpu":
            # DeepSpeed fixed its accelerator at first use; a CUDA one would put ZeRO buffers on the GPU.
            raise RuntimeError(
                f"Lightning runs on CPU but DeepSpeed picked the {ds_device!r} accelerator. Set"
                " DS_ACCELERATOR=cpu in the environment before deepspeed is imported."
            )
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        """CPU devices carry no index, so the parent's ``device.index == local_rank`` check cannot hold."""
        if not self._on_cpu:
            super().setup_distributed()
            return
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        """Give the CPU device an index: Lightning hands ``root_device.index`` to DeepSpeed as ``device_rank``,
        and the engine evaluates ``device_rank >= 0`` (TypeError for ``None``; a negative rank would make it
        assume world size 1). DeepSpeed's CPU accelerator ignores the value otherwise."""
        device = super().root_device
        if device.type == "cpu" and device.index is None:
            return torch.device("cpu", self.local_rank)
        return device

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """Mirror Lightning's ``deepspeed_stage_*`` names under a ``deepspeed_cpu`` prefix."""
        presets: dict[str, tuple[str, dict]] = {
            "deepspeed_cpu": ("DeepSpeed (CPU-capable), ZeRO stage 2", {}),
            "deepspeed_cpu_stage_1": ("DeepSpeed (CPU-capable), ZeRO stage 1", {"stage": 1}),
            "deepspeed_cpu_stage_2": ("DeepSpeed (CPU-capable), ZeRO stage 2", {"stage": 2}),
            "deepspeed_cpu_stage_2_offload": (
                "DeepSpeed (CPU-capable), ZeRO stage 2 with optimizer offload",
                {"stage": 2, "offload_optimizer": True},
            ),
            "deepspeed_cpu_stage_3": ("DeepSpeed (CPU-capable), ZeRO stage 3", {"stage": 3}),
            "deepspeed_cpu_stage_3_offload": (
                "DeepSpeed (CPU-capable), ZeRO stage 3 with optimizer and parameter offload",
                {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
            ),
        }
        for name, (description, init_params) in presets.items():
            strategy_registry.register(name, cls, description=description, override=True, **init_params)


def register_cpu_deepspeed_strategies() -> None:
    """Add the ``deepspeed_cpu*`` names to Lightning's global StrategyRegistry (idempotent)."""
    from lightning.pytorch.strategies import StrategyRegistry

    CPUDeepSpeedStrategy.register_strategies(StrategyRegistry)
