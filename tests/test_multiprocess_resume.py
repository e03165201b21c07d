"""Exact resume on 2 processes: DDP and ZeRO-3, through the `aa` command, after a run is interrupted.

Six steps straight, and a run interrupted after step 3 (its periodic checkpoint written, as a crash or a
preemption would leave it) then resumed with `--ckpt_path last`, log the same losses for steps 4-6: the
checkpoint carries the weights, optimizer, schedule, RNG and every rank's loader position; under ZeRO-3 it is
a DeepSpeed directory written by both ranks.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from launch_env import DIST_ENV

REPO = Path(__file__).resolve().parents[1]


def aa_fit(root: Path, strategy: str, interrupt_after: int | None = None, resume: bool = False) -> None:
    args = [
        sys.executable, "-m", "aa_lightning.cli", "fit",
        "--config", str(REPO / "configs" / "tiny" / "sft_t2t.yaml"),
        "--trainer.devices", os.environ.get("AA_RESUME_DEVICES", "2"),
        "--trainer.strategy", strategy,
        "--trainer.max_steps", "6",
        "--checkpoint.every_n_train_steps", "3",
        "--trainer.val_check_interval", "1000",
        "--trainer.limit_val_batches", "0",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.class_path", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir", str(root / "csv"),
        "--data.init_args.train.size", "32",
        "--export.enabled", "false",
    ]  # fmt: skip
    if interrupt_after is not None:
        args += [
            "--trainer.callbacks+=interruption.InterruptAfterStep",
            f"--trainer.callbacks.init_args.step={interrupt_after}",
        ]
    if resume:
        args += ["--ckpt_path", "last"]
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")])),
    )
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"aa fit hung:\n{output[-3000:]}")
    if interrupt_after is None:
        assert proc.returncode == 0, output[-4000:]
    else:
        assert proc.returncode != 0 and f"interrupted after step {interrupt_after}" in output, output[-4000:]


def step_losses(root: Path) -> dict[int, float]:
    """``train/loss`` by optimizer step from every CSV log of the run (the resumed run writes a new version)."""
    losses: dict[int, float] = {}
    for path in sorted((root / "csv").rglob("metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    losses[int(row["step"])] = float(row["train/loss"])
    return losses


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_cpu_stage_3"])
def test_two_process_resume_continues_exactly(strategy: str, tmp_path: Path) -> None:
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    aa_fit(straight, strategy)
    aa_fit(interrupted, strategy, interrupt_after=3)
    assert list((interrupted / "checkpoints").glob("last*"))
    aa_fit(interrupted, strategy, resume=True)
    expected, resumed = step_losses(straight), step_losses(interrupted)
    later = [s for s in sorted(expected) if s >= 3]
    assert len(later) >= 3, expected
    for step in later:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, resumed, expected)
    assert expected[later[-1]] != expected[later[0]]  # the steps differ: the comparison is not trivial
