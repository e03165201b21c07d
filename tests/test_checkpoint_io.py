"""Checkpoints are never half-written: interrupted saves are cleaned up, DeepSpeed directories appear whole,
and ``--ckpt_path last`` without a checkpoint says so in one line.

Interrupted saves are real: a child process dies (``os._exit``) in the middle of ``torch.save``, or keeps a
save open while the cleanup runs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from launch_env import DIST_ENV
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from aa_lightning import checkpoint_io
from aa_lightning.checkpoint_io import AtomicCheckpointIO

REPO_ROOT = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith((".tmp-", ".old-")))


def dead_pid() -> int:
    """The pid of a process that has exited."""
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(out.stdout)


def dead_writer_name(target: Path, kind: str = "tmp") -> Path:
    """What a killed writer on this machine leaves next to ``target`` (``kind``: tmp, or old mid-swap)."""
    return target.parent / f".{kind}-{dead_pid()}@{socket.gethostname()}+0badc0de.{target.name}"


# -- files ---------------------------------------------------------------------------------------------------
_KILLED_SAVE = """
import os, sys, torch
from aa_lightning.checkpoint_io import AtomicCheckpointIO

class DiesWhilePickled:
    def __reduce__(self):
        os._exit(9)  # the process dies mid-save: no cleanup code runs

io = AtomicCheckpointIO()
io.save_checkpoint({"step": 1, "w": torch.ones(4096)}, sys.argv[1])
io.save_checkpoint({"step": 2, "w": torch.zeros(4096), "x": DiesWhilePickled()}, sys.argv[1])
"""


def test_killed_save_keeps_the_previous_checkpoint_and_the_next_save_removes_its_temp(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(target)], env=child_env(), capture_output=True, text=True
    )
    assert proc.returncode == 9, proc.stderr[-2000:]
    (stale,) = leftovers(target.parent)
    assert stale.startswith(".tmp-") and stale.endswith(".last.ckpt")
    assert torch.load(target, weights_only=True)["step"] == 1  # the previous checkpoint is intact

    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 3}, target)
    assert leftovers(target.parent) == []
    assert io.load_checkpoint(target)["step"] == 3


def test_resume_removes_the_temp_of_a_killed_save(tmp_path):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)
    dead_writer_name(target).write_bytes(b"PK\x03\x04 half a zip")
    assert io.load_checkpoint(target)["step"] == 1
    assert leftovers(tmp_path) == []


_LIVE_WRITER = """
import sys, time
from aa_lightning.checkpoint_io import temporary_sibling

tmp = temporary_sibling(sys.argv[1])
open(tmp, "wb").write(b"being written")
print(tmp, flush=True)
time.sleep(120)
"""


def test_a_save_still_being_written_by_a_live_process_is_left_alone(tmp_path):
    target = tmp_path / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", _LIVE_WRITER, str(target)], env=child_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        tmp = proc.stdout.readline().strip()
        AtomicCheckpointIO().save_checkpoint({"step": 1}, target)  # a save of this process next to it
        assert checkpoint_io.remove_stale_partial_saves(str(tmp_path)) == []
        assert os.path.exists(tmp)
    finally:
        proc.kill()
        proc.wait()
    assert checkpoint_io.remove_stale_partial_saves(str(tmp_path)) == [tmp]  # its writer is gone now


def test_a_reused_pid_is_not_taken_for_the_writer(tmp_path):
    """A restarted container can give the new process the pid of the killed one: the start time differs."""
    mine = Path(checkpoint_io.temporary_sibling(str(tmp_path / "last.ckpt")))
    pid_start, rest = mine.name[len(".tmp-") :].split("@", 1)
    pid, start = pid_start.split(".")
    earlier = tmp_path / f".tmp-{pid}.{int(start) - 1}@{rest}"
    earlier.write_bytes(b"from the killed process")
    mine.write_bytes(b"this process's own save in progress")
    assert checkpoint_io.remove_stale_partial_saves(str(tmp_path)) == [str(earlier)]
    assert mine.exists()


def test_failed_save_removes_its_temp_and_unstamped_temps_are_cleaned(tmp_path):
    class FailsWhilePickled:
        def __reduce__(self):
            raise RuntimeError("disk full")

    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)
    (tmp_path / ".tmp-k2j4_x9a.ckpt").write_bytes(b"left by an older version")  # mkstemp's name
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "x": FailsWhilePickled()}, target)
    assert leftovers(tmp_path) == []
    assert io.load_checkpoint(target)["step"] == 1


# -- DeepSpeed directories -----------------------------------------------------------------------------------
class TinyModule(pl.LightningModule):
    def configure_model(self) -> None:
        if not hasattr(self, "net"):
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def tiny_loader() -> DataLoader:
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)


def tiny_trainer(strategy: str, max_steps: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=kwargs.pop("devices", 1),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def saved_step(checkpoint_dir: Path) -> int:
    client = torch.load(checkpoint_dir / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False)
    return client["global_step"]


def test_deepspeed_checkpoint_directory_is_replaced_whole(tmp_path):
    import aa_lightning.strategies  # noqa: F401  (deepspeed_cpu_* names)

    target = tmp_path / "last.ckpt"
    trainer = tiny_trainer("deepspeed_cpu_stage_2", max_steps=2)
    trainer.fit(TinyModule(), tiny_loader())
    trainer.save_checkpoint(target)
    assert (target / "latest").read_text().strip() == "checkpoint" and saved_step(target) == 2
    dead_writer_name(target).mkdir()  # a killed save's partial directory: removed by the next save
    trainer.save_checkpoint(target)  # replaces an existing directory
    assert leftovers(tmp_path) == [] and saved_step(target) == 2

    class FailsWhilePickled:
        def __reduce__(self):
            raise RuntimeError("disk full")

    trainer.lightning_module.on_save_checkpoint = lambda checkpoint: checkpoint.update(x=FailsWhilePickled())
    with pytest.raises(RuntimeError, match="disk full"):
        trainer.save_checkpoint(target)
    assert leftovers(tmp_path) == [] and saved_step(target) == 2  # the previous checkpoint survives whole

    # killed between the swap's two renames: the previous version sits aside, the target is missing
    target.rename(dead_writer_name(target, "old"))
    resumed = tiny_trainer("deepspeed_cpu_stage_2", max_steps=3)
    resumed.fit(TinyModule(), tiny_loader(), ckpt_path=str(target))  # resuming puts it back first
    assert resumed.global_step == 3 and leftovers(tmp_path) == []


_TWO_PROCESS_SAVE = """
import json, os, sys
sys.path.insert(0, {tests_dir!r})
from test_checkpoint_io import TinyModule, tiny_loader, tiny_trainer
import aa_lightning.strategies  # noqa: F401

class DiesWhilePickled:
    def __reduce__(self):
        os._exit(9)

target = {target!r}
trainer = tiny_trainer("deepspeed_cpu_stage_3", max_steps=1, devices=2)
module = TinyModule()
trainer.fit(module, tiny_loader())
for index in (1, 2):  # the second save replaces the first directory
    module.on_save_checkpoint = lambda checkpoint: checkpoint.update(save_index=index)
    trainer.save_checkpoint(target)
    # right after save_checkpoint returns, on every rank, the directory is complete and in place
    listing = sorted(os.listdir(os.path.join(target, "checkpoint")))
    with open(os.path.join({out!r}, f"rank{{trainer.global_rank}}_save{{index}}.json"), "w") as f:
        json.dump(listing, f)
# the third save is killed on rank 0 while it writes the model states
if trainer.global_rank == 0:
    module.on_save_checkpoint = lambda checkpoint: checkpoint.update(save_index=3, x=DiesWhilePickled())
trainer.save_checkpoint(target)
"""


def test_deepspeed_checkpoint_directory_is_atomic_with_two_processes(tmp_path):
    target = tmp_path / "ckpts" / "last.ckpt"
    script = tmp_path / "two_proc_save.py"
    script.write_text(
        textwrap.dedent(_TWO_PROCESS_SAVE).format(
            tests_dir=str(Path(__file__).parent), target=str(target), out=str(tmp_path)
        )
    )
    env = child_env()
    env["OMP_NUM_THREADS"] = "1"
    log_file = open(tmp_path / "output.txt", "w")
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # rank 1 (started by Lightning's launcher) is killed together with rank 0
    )
    try:
        returncode = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 1 waits in a barrier for the killed rank 0
        log_file.close()
    output = (tmp_path / "output.txt").read_text()[-4000:]
    assert returncode == 9, output
    shards = {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    for rank in (0, 1):
        for index in (1, 2):
            listing = json.loads((tmp_path / f"rank{rank}_save{index}.json").read_text())
            assert shards | {"zero_pp_rank_0_mp_rank_00_model_states.pt"} <= set(listing), listing
    # the checkpoint of the second save is whole; the killed save left its partial directory aside
    assert (target / "latest").read_text().strip() == "checkpoint"
    model_states = target / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    assert torch.load(model_states, weights_only=False)["save_index"] == 2
    for shard in shards:
        torch.load(target / "checkpoint" / shard, weights_only=False)  # complete files
    (partial,) = leftovers(target.parent)
    assert partial.startswith(".tmp-")
    assert checkpoint_io.remove_stale_partial_saves(str(target.parent)) == [str(target.parent / partial)]


def test_lightning_deepspeed_names_get_atomic_directories(repo_path, tmp_path):
    from aa_lightning.cli import build_cli
    from aa_lightning.strategies import CPUDeepSpeedStrategy

    cli = build_cli(
        [
            "--config",
            repo_path("configs", "tiny", "sft_t2t.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.strategy",
            "deepspeed_stage_3",
        ],
        run=False,
    )
    assert isinstance(cli.trainer.strategy, CPUDeepSpeedStrategy)
    assert cli.trainer.strategy.config["zero_optimization"]["stage"] == 3


# -- --ckpt_path last ----------------------------------------------------------------------------------------
def tiny_sft_args(repo_path, root: Path) -> list[str]:
    return [
        "--config",
        repo_path("configs", "tiny", "sft_t2t.yaml"),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--ckpt_path",
        "last",
    ]


def test_fit_with_ckpt_path_last_and_no_checkpoint_starts_fresh_in_one_line(repo_path, tmp_path, caplog):
    from aa_lightning.cli import build_cli

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    stale = dead_writer_name(checkpoints / "last.ckpt")
    stale.write_bytes(b"a save killed before it finished")
    with caplog.at_level(logging.WARNING, logger="aa_lightning"):
        cli = build_cli(["fit", *tiny_sft_args(repo_path, tmp_path), "--trainer.max_steps", "1"])
    assert cli.trainer.global_step == 1
    lines = [r.getMessage() for r in caplog.records if "--ckpt_path last" in r.getMessage()]
    assert lines == [f"--ckpt_path last: no checkpoint in {checkpoints} yet; starting a new run"]
    assert not stale.exists()  # cleaned at start
    assert (checkpoints / "last.ckpt").is_file() and leftovers(checkpoints) == []


def test_validate_with_ckpt_path_last_and_no_checkpoint_is_one_clear_line(repo_path, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "aa_lightning.cli", "validate", *tiny_sft_args(repo_path, tmp_path)],
        env=child_env(),
        cwd=repo_path(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --ckpt_path last: no checkpoint in {tmp_path / 'checkpoints'} to validate from; run `aa fit` "
        "with the same --trainer.default_root_dir first, or pass --ckpt_path PATH"
    )
