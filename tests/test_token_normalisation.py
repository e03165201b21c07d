"""Token-mean losses do not depend on how an optimizer step is split into micro-batches and ranks.

SFT's NLL and ORPO's NLL term divide by the labelled-token count of the whole optimizer step (TRL's
``num_items_in_batch``). The same 8 real rows as one batch of 8, as 2 accumulated batches of 4, and as
2 DDP ranks x 4 must give the same first-step gradient and log the same step loss; the per-micro-batch
token mean (the previous formula) gives a measurably different gradient on the same splits.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

from aa_lightning.algorithms import OptimConfig, ORPOModule, SFTModule
from aa_lightning.algorithms.logprobs import sequence_log_probs
from aa_lightning.batch import STEP_CHOSEN_LABEL_TOKENS, STEP_LABEL_TOKENS
from aa_lightning.data import DataSpec, TextToTextDataModule
from aa_lightning.data.loader import LengthGroupedSampler, plan_step_tokens, scored_label_counts
from aa_lightning.models.aliases import resolve_model_path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = {
    "sft": ("alpaca_200.json", "Alpaca", 96),
    "orpo": ("hh_rlhf_train_128.jsonl", "HH-RLHF", 64),
}
TOKEN_INPUTS = ("input_ids", "attention_mask", "labels")
# float32 sums in another order (other padding, other micro-batches) differ by ~1e-7 relative
TOLERANCE = 2e-5


def datamodule(method: str, batch_size: int, **kwargs) -> TextToTextDataModule:
    name, template, max_length = DATA[method]
    spec = DataSpec(str(REPO_ROOT / "configs" / "data" / name), template, size=8)
    return TextToTextDataModule(
        "tiny-qwen2", train=spec, max_length=max_length, batch_size=batch_size, **kwargs
    )


def module(method: str) -> pl.LightningModule:
    optim = OptimConfig(lr=1e-3, warmup_steps=0, scheduler="constant")
    if method == "sft":
        return SFTModule("tiny-qwen2", optim=optim)
    return ORPOModule("tiny-qwen2", orpo_lambda=0.5, optim=optim)


class FirstStep(pl.Callback):
    """The micro-batches and the (rank-reduced) gradient of the first optimizer step."""

    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []
        self.grads: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self.batches.append({k: batch[k].detach().cpu().clone() for k in TOKEN_INPUTS})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is None:
            self.grads = {
                n: p.grad.detach().cpu().clone()
                for n, p in pl_module.named_parameters()
                if p.grad is not None
            }


def first_step(
    method: str, batch_size: int, accumulate: int = 1, devices: int = 1, root: str = "."
) -> tuple[FirstStep, dict[str, float]]:
    """Trains one optimizer step; returns its batches and gradient, and the logged step metrics."""
    pl.seed_everything(0)
    recorder = FirstStep()
    trainer = pl.Trainer(
        default_root_dir=root,
        max_steps=1,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(module(method), datamodule(method, batch_size))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    return recorder, metrics


def micro_batch_mean_gradient(method: str, batches: list[list[dict[str, torch.Tensor]]]) -> dict:
    """The previous formula: the mean over micro-batches (``batches[rank][i]``) of each one's token mean."""
    pl.seed_everything(0)
    m = module(method)
    m.configure_model()
    count = sum(len(rank) for rank in batches)
    for batch in (b for rank in batches for b in rank):
        if method == "sft":
            nll, tokens = m.token_nll(batch)
            loss = nll / tokens
        else:
            loss, _ = m.compute_loss(batch, "val")  # outside training: the micro-batch's token mean
        (loss / count).backward()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    squared = sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n in b)
    return math.sqrt(squared / sum(float((b[n].double() ** 2).sum()) for n in b))


def scored(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    return [int((b["labels"][:, 1:] != -100).sum()) for b in batches]


_DDP_SCRIPT = """
import json, sys
import torch

torch.set_num_threads(1)
sys.path.insert(0, {tests_dir!r})
from test_token_normalisation import first_step

if __name__ == "__main__":
    for method in ("sft", "orpo"):
        recorder, metrics = first_step(method, batch_size=4, devices=2, root={out_dir!r})
        rank = torch.distributed.get_rank()
        torch.save({{"grads": recorder.grads, "batches": recorder.batches, "metrics": metrics}},
                   {out_dir!r} + f"/{{method}}_rank{{rank}}.pt")
"""


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, list[dict]]:
    """Both methods on 2 CPU processes (gloo), 1 thread each, in one launched script."""
    out = tmp_path_factory.mktemp("ddp")
    script = out / "ddp_first_step.py"
    script.write_text(
        textwrap.dedent(_DDP_SCRIPT).format(tests_dir=str(Path(__file__).parent), out_dir=str(out))
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=out,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a hang is killed together with the rank-1 child
    )
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"2-process DDP run hung:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    assert "announced" not in output, output[-4000:]  # the loader's windows matched the trainer's
    return {
        method: [torch.load(out / f"{method}_rank{r}.pt", weights_only=False) for r in (0, 1)]
        for method in ("sft", "orpo")
    }


@pytest.fixture(scope="module")
def whole_batch_runs(tmp_path_factory) -> dict[str, tuple[FirstStep, dict[str, float]]]:
    """The reference: the 8 rows as one batch on one process."""
    root = tmp_path_factory.mktemp("whole")
    return {method: first_step(method, batch_size=8, root=str(root)) for method in ("sft", "orpo")}


def step_token_mean(method: str, batches: list[dict[str, torch.Tensor]]) -> float:
    """The step's NLL over all its labelled (ORPO: chosen) tokens, from the untrained model."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-qwen2"))
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            if method == "orpo":  # the chosen rows come first
                batch = {k: v[: v.shape[0] // 2] for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logps = sequence_log_probs(logits, batch["labels"])
            nll, tokens = nll - float(logps.sum.sum()), tokens + int(logps.token_count.sum())
    return nll / tokens


@pytest.mark.parametrize("method", ["sft", "orpo"])
def test_same_gradient_for_one_batch_accumulation_and_ddp(method, tmp_path, whole_batch_runs, ddp_runs):
    whole, whole_metrics = whole_batch_runs[method]
    accumulated, accumulated_metrics = first_step(method, 4, accumulate=2, root=str(tmp_path))
    ranks = ddp_runs[method]
    assert len(whole.batches) == 1 and len(accumulated.batches) == 2
    assert [len(r["batches"]) for r in ranks] == [1, 1]

    # the splits are uneven in tokens, so the mean of micro-batch means is measurably another objective
    assert len(set(scored(accumulated.batches))) == 2
    old_accumulated = micro_batch_mean_gradient(method, [accumulated.batches])
    old_ddp = micro_batch_mean_gradient(method, [r["batches"] for r in ranks])
    assert relative_difference(old_accumulated, whole.grads) > 100 * TOLERANCE
    assert relative_difference(old_ddp, whole.grads) > 100 * TOLERANCE

    assert relative_difference(accumulated.grads, whole.grads) < TOLERANCE
    for rank in ranks:  # DDP averaged the ranks' gradients
        assert relative_difference(rank["grads"], whole.grads) < TOLERANCE

    # the logged step loss is the token mean of the whole step, whatever the split
    name = "train/nll_loss" if method == "orpo" else "train/loss"
    assert whole_metrics[name] == pytest.approx(step_token_mean(method, accumulated.batches), rel=1e-5)
    names = ["train/loss"] + (["train/nll_loss", "train/or_loss"] if method == "orpo" else [])
    for name in names:
        for other in (accumulated_metrics, ranks[0]["metrics"], ranks[1]["metrics"]):
            assert other[name] == pytest.approx(whole_metrics[name], rel=1e-5), name


def test_a_loader_of_your_own_without_counts(tmp_path, whole_batch_runs):
    """Without planned counts the batch's own count (summed over ranks) is exact without accumulation."""
    whole, _ = whole_batch_runs["sft"]
    dm = datamodule("sft", 8, kind="supervised")
    dm.setup("fit")
    collate = dm.build_collator("supervised")

    def fit(batch_size: int, accumulate: int) -> FirstStep:
        pl.seed_everything(0)
        recorder = FirstStep()
        trainer = pl.Trainer(
            default_root_dir=str(tmp_path),
            max_steps=1,
            accelerator="cpu",
            devices=1,
            accumulate_grad_batches=accumulate,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[recorder],
        )
        loader = torch.utils.data.DataLoader(dm.datasets["train"], batch_size=batch_size, collate_fn=collate)
        trainer.fit(module("sft"), loader)
        return recorder

    assert relative_difference(fit(8, 1).grads, whole.grads) < TOLERANCE
    with pytest.warns(UserWarning, match="carry no 'step_label_tokens' count"):
        fit(4, 2)


class SGDSFTModule(SFTModule):
    """Plain SGD with lr 1: the first update is minus the gradient (DeepSpeed keeps no ``.grad``)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=1.0)


class FirstUpdate(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


@pytest.fixture
def _restore_env():
    """The DeepSpeed strategy exports RANK/LOCAL_RANK/...; later tests must not see them.

    Lightning's launcher also sets torch's thread count to the CPU count unless OMP_NUM_THREADS is set.
    """
    saved, threads = dict(os.environ), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    yield
    os.environ.clear()
    os.environ.update(saved)
    torch.set_num_threads(threads)


def test_deepspeed_engine_accumulation_is_undone_too(tmp_path, whole_batch_runs, _restore_env):
    """Under DeepSpeed the engine divides the loss by its accumulation steps after Lightning did."""
    import aa_lightning.strategies  # noqa: F401  (registers deepspeed_cpu_stage_2)

    whole, _ = whole_batch_runs["sft"]
    pl.seed_everything(0)
    update = FirstUpdate()
    trainer = pl.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=1,
        accelerator="cpu",
        devices=1,
        strategy="deepspeed_cpu_stage_2",
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[update],
    )
    sft = SGDSFTModule("tiny-qwen2")
    trainer.fit(sft, datamodule("sft", 4))
    minus_update = {n: update.start[n] - p.detach() for n, p in sft.named_parameters() if n in whole.grads}
    assert relative_difference(minus_update, whole.grads) < TOLERANCE


class StepLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "train/loss" in trainer.callback_metrics:  # logged by the last micro-batch of each step
            self.losses[trainer.global_step] = float(trainer.callback_metrics["train/loss"])


class StopAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_mid_epoch_resume_with_accumulation_keeps_the_step_means(tmp_path, recwarn):
    """8 rows, batch 2 x accumulate 2: 2 steps per epoch, so the checkpoint at step 3 is mid-epoch."""

    def run(root: str, stop_at: int | None = None, ckpt_path: str | None = None) -> dict[int, float]:
        pl.seed_everything(0)
        losses = StepLosses()
        checkpoint = ModelCheckpoint(
            dirpath=str(tmp_path / root / "ckpt"), save_last=True, save_top_k=0, every_n_train_steps=3
        )
        trainer = pl.Trainer(
            default_root_dir=str(tmp_path / root),
            max_steps=6,
            accelerator="cpu",
            devices=1,
            accumulate_grad_batches=2,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[losses, checkpoint] + ([StopAt(stop_at)] if stop_at else []),
        )
        trainer.fit(module("sft"), datamodule("sft", 2), ckpt_path=ckpt_path)
        return losses.losses

    straight = run("straight")
    run("interrupted", stop_at=3)
    resumed = run("resumed", ckpt_path=str(tmp_path / "interrupted" / "ckpt" / "last.ckpt"))
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6), step
    assert not [w for w in recwarn if "announced" in str(w.message)]  # loader and trainer agreed on windows


def test_scored_label_counts_match_the_loss_positions():
    dm = datamodule("orpo", 4, kind="preference")
    dm.setup("fit")
    data = dm.datasets["train"].select([5, 1, 6])  # an indices mapping, as after filtering
    for column in ("chosen_labels", "rejected_labels"):
        expected = [sum(t != -100 for t in labels[1:]) for labels in data[column]]
        assert scored_label_counts(data, column).tolist() == expected
        assert min(expected) > 0


def test_plan_follows_lightning_windows():
    counts = {"k": np.array([1, 2, 4, 8, 16, 32, 64])}
    batches = [[0, 1], [2, 3], [4, 5], [6]]
    # accumulate 3: batches 0-2 are one step, batch 3 (the epoch's last) another
    assert [p["k"] for p in plan_step_tokens(batches, counts, 3)] == [63, 63, 63, 64]
    # resumed after 2 batches of the epoch: batch 2 closes its window ((2 + 1) % 3 == 0) on its own
    assert [p["k"] for p in plan_step_tokens(batches[2:], counts, 3, first_batch=2)] == [48, 64]
    # limit_train_batches=2 ends the epoch after batch 1, which closes the step
    assert [p["k"] for p in plan_step_tokens(batches, counts, 3, epoch_batches=2)][:2] == [15, 15]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resumed_loader_plans_the_rest_of_the_window(group_by_length):
    """The datamodule's loader, resumed mid-window, announces only the tokens of the batches it will yield."""
    dm = datamodule("sft", 2, kind="supervised", group_by_length=group_by_length)
    dm.setup("fit")
    schedule = (3, math.inf)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, LengthGroupedSampler) == group_by_length
    loader.schedule_fn = lambda: schedule
    full = list(loader)
    per_batch = scored(full)
    assert [b["extra"][STEP_LABEL_TOKENS].tolist() for b in full] == [[sum(per_batch[:3])] * 2] * 3 + [
        [per_batch[3]] * 2
    ]
    loader.load_state_dict({"epoch": 0, "batches": 1})
    resumed = list(loader)
    assert [b["input_ids"].tolist() for b in resumed] == [b["input_ids"].tolist() for b in full[1:]]
    assert [int(b["extra"][STEP_LABEL_TOKENS][0]) for b in resumed] == [sum(per_batch[1:3])] * 2 + [
        per_batch[3]
    ]
    assert STEP_CHOSEN_LABEL_TOKENS not in full[0]["extra"]


def test_preference_batches_carry_chosen_and_all_counts():
    dm = datamodule("orpo", 4, kind="preference")
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.schedule_fn = lambda: (2, math.inf)
    batches = list(loader)
    chosen = [int((b["labels"][: b["labels"].shape[0] // 2, 1:] != -100).sum()) for b in batches]
    assert [int(b["extra"][STEP_CHOSEN_LABEL_TOKENS][0]) for b in batches] == [sum(chosen)] * 2
    assert [int(b["extra"][STEP_LABEL_TOKENS][0]) for b in batches] == [sum(scored(batches))] * 2
    assert batches[0]["extra"][STEP_LABEL_TOKENS].shape == (4,)
