"""DeepSpeed ZeRO-2/3 on CPU through ``CPUDeepSpeedStrategy``.

``deepspeed`` is only imported inside functions: ``aa_lightning.strategies`` must set ``DS_ACCELERATOR`` and
``TORCH_EXTENSIONS_DIR`` before DeepSpeed's first import, and a top-level ``import deepspeed`` would be sorted
ahead of the first-party import. The first test to initialise DeepSpeed pays for the JIT build of its CPU
communication op (tens of seconds to ~2 min); the shared cache makes every later test and run reuse it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from launch_env import DIST_ENV
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from aa_lightning.strategies import CPUDeepSpeedStrategy, zero_config

REPO_ROOT = Path(__file__).resolve().parents[1]
# Env vars the strategy writes for torch.distributed; they must not leak into later tests or child runs.


class TinyModule(pl.LightningModule):
    """A few Linear layers built in ``configure_model`` so ZeRO-3 can shard them at construction."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = not manual
        self.net: nn.Module | None = None
        self.build_info: dict[str, object] = {}
        self.losses: list[float] = []
        self.start_step: int | None = None
        self.start_params: dict[str, torch.Tensor] = {}
        self.start_optim_state: int = 0

    def configure_model(self) -> None:
        if self.net is not None:
            return
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
        w = self.net[0].weight
        self.build_info = {
            "has_ds_id": hasattr(w, "ds_id"),
            "ds_numel": getattr(w, "ds_numel", None),
            "local_numel": w.numel(),
        }

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x).float(), y.float())
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        self.losses.append(loss.detach().float().item())
        return loss

    def on_train_start(self) -> None:
        self.start_step = self.trainer.global_step
        self.start_params = full_params(self)
        engine = self.trainer.strategy.deepspeed_engine
        self.start_optim_state = len(engine.optimizer.optimizer.state)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def full_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 copies of all parameters, gathered first when they are ZeRO-3 shards."""
    import deepspeed

    params = dict(module.named_parameters())
    sharded = [p for p in params.values() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(sharded, enabled=bool(sharded)):
        return {name: p.detach().float().clone() for name, p in params.items()}


def loader(n: int = 64, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=batch_size)


def make_trainer(strategy: str | CPUDeepSpeedStrategy, max_steps: int = 3, **kwargs: object) -> pl.Trainer:
    defaults: dict[str, object] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(strategy=strategy, **defaults)


def zero3_unpersisted() -> dict:
    """ZeRO-3 config that shards even tiny parameters (the default keeps tensors < 1e5 elements whole)."""
    cfg = zero_config(stage=3)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return cfg


def test_registered_names() -> None:
    for name, stage in [("deepspeed_cpu_stage_2", 2), ("deepspeed_cpu_stage_3", 3), ("deepspeed_cpu", 2)]:
        assert name in StrategyRegistry
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, CPUDeepSpeedStrategy)
        assert strategy.config["zero_optimization"]["stage"] == stage
    offload = StrategyRegistry.get("deepspeed_cpu_stage_3_offload").config["zero_optimization"]
    assert offload["offload_param"]["device"] == "cpu"
    assert os.environ["DS_ACCELERATOR"] == "cpu" or torch.cuda.is_available()


def test_strategy_name_from_yaml(tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "trainer:\n  accelerator: cpu\n  devices: 1\n  strategy: deepspeed_cpu_stage_3\n  logger: false\n"
    )
    cli = LightningCLI(TinyModule, run=False, args=["--config", str(cfg)], save_config_callback=None)
    assert isinstance(cli.trainer.strategy, CPUDeepSpeedStrategy)
    assert cli.trainer.strategy.config["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_zero2_fit(precision: str) -> None:
    model = TinyModule()
    trainer = make_trainer("deepspeed_cpu_stage_2", precision=precision)
    assert isinstance(trainer.strategy, CPUDeepSpeedStrategy)
    trainer.fit(model, loader())
    assert trainer.global_step == 3
    assert len(model.losses) == 3 and all(math.isfinite(v) for v in model.losses)
    assert trainer.strategy.root_device.index == 0
    if precision == "bf16-mixed":
        assert next(trainer.strategy.deepspeed_engine.module.parameters()).dtype == torch.bfloat16


def test_zero3_shards_at_build_and_fits() -> None:
    model = TinyModule()
    trainer = make_trainer(CPUDeepSpeedStrategy(config=zero3_unpersisted()))
    trainer.fit(model, loader())
    info = model.build_info
    assert info["has_ds_id"] and info["ds_numel"] == 16 * 64
    assert info["local_numel"] == 0  # partitioned inside zero.Init: only the shard (ds_tensor) holds data
    assert all(hasattr(p, "ds_numel") and hasattr(p, "ds_id") for p in model.parameters())
    assert trainer.global_step == 3 and all(math.isfinite(v) for v in model.losses)


def test_zero3_manual_optimization() -> None:
    model = TinyModule(manual=True)
    trainer = make_trainer(CPUDeepSpeedStrategy(config=zero3_unpersisted()))
    trainer.fit(model, loader())
    assert trainer.global_step == 3
    assert len(model.losses) == 3 and all(math.isfinite(v) for v in model.losses)
    after = full_params(model)
    changed = [name for name, p in after.items() if not torch.equal(p, model.start_params[name])]
    assert len(changed) == len(after), "every parameter should have been updated by optimizer.step()"


def test_zero2_checkpoint_resume(tmp_path: Path) -> None:
    first = TinyModule()
    trainer = make_trainer("deepspeed_cpu_stage_2", max_steps=3)
    trainer.fit(first, loader())
    ckpt = tmp_path / "zero2.ckpt"
    trainer.save_checkpoint(ckpt)
    assert ckpt.is_dir() and (ckpt / "checkpoint").is_dir()  # a DeepSpeed checkpoint directory
    saved = full_params(first)

    torch.manual_seed(123)  # different init, so equality below proves the weights were loaded
    resumed = TinyModule()
    trainer = make_trainer("deepspeed_cpu_stage_2", max_steps=5)
    trainer.fit(resumed, loader(), ckpt_path=ckpt)
    assert resumed.start_step == 3
    assert resumed.start_optim_state > 0  # Adam moments restored by DeepSpeed
    for name, p in saved.items():
        torch.testing.assert_close(resumed.start_params[name], p)
    assert trainer.global_step == 5 and len(resumed.losses) == 2


_TWO_PROCESS_SCRIPT = """
import json, sys
from pathlib import Path

import torch
import lightning.pytorch as pl

sys.path.insert(0, {tests_dir!r})
from test_deepspeed_cpu import TinyModule, loader, make_trainer, zero3_unpersisted
from aa_lightning.strategies import CPUDeepSpeedStrategy

out = Path({out_dir!r})
model = TinyModule()
trainer = make_trainer(CPUDeepSpeedStrategy(config=zero3_unpersisted()), devices=2)
trainer.fit(model, loader())
w = model.net[0].weight
result = dict(
    rank=trainer.global_rank,
    world_size=torch.distributed.get_world_size(),
    engine_world_size=trainer.strategy.deepspeed_engine.world_size,
    ds_numel=w.ds_numel,
    shard_numel=w.ds_tensor.numel(),
    losses=model.losses,
    global_step=trainer.global_step,
)
(out / f"rank{{trainer.global_rank}}.json").write_text(json.dumps(result))
"""


def test_zero3_two_processes(tmp_path: Path) -> None:
    script = tmp_path / "two_proc.py"
    script.write_text(
        textwrap.dedent(_TWO_PROCESS_SCRIPT).format(
            tests_dir=str(Path(__file__).parent), out_dir=str(tmp_path)
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # Own session so a hang can be killed together with the rank-1 child Lightning's launcher starts.
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"2-process ZeRO-3 run hung:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, res in enumerate(results):
        assert res["rank"] == rank
        assert res["world_size"] == res["engine_world_size"] == 2
        assert res["shard_numel"] == math.ceil(res["ds_numel"] / 2)  # each rank holds half of the weight
        assert res["global_step"] == 3 and all(math.isfinite(v) for v in res["losses"])
