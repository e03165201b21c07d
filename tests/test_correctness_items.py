"""Issue 10, section 6: Safe-RLHF advantage mixing, float32 log-probs, ptx per optimizer update, and
validation metrics reduced over ranks.

Each test pins a number a user's run depends on: the actor's advantages (by hand from the formula), the
log-probs of bf16 logits (against float64), how often the ptx loss enters the updates, and what
``val/*`` reports when two processes each see part of the validation set.
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
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from launch_env import DIST_ENV
from transformers import AutoModelForCausalLM

from aa_lightning.algorithms import GenerationConfig, GRPOModule, OptimConfig, PPOModule, SafeRLHFModule
from aa_lightning.algorithms.logprobs import (
    causal_lm_log_probs,
    entropy_from_logits,
    selective_log_softmax,
    sequence_log_probs,
)
from aa_lightning.algorithms.rl.metrics import MetricAccumulator
from aa_lightning.algorithms.rl.rollout import Rollout
from aa_lightning.data import TextToTextDataModule
from aa_lightning.models.aliases import resolve_model_path
from aa_lightning.rewards import RewardSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
E_SHARE = [RewardSpec("target_token_share", kwargs={"target": "e"})]


class Recorder(pl.Callback):
    """The logged metrics after every training batch (one rollout)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def alpaca(repo_path: Any, size: int) -> dict[str, Any]:
    return {"path": repo_path("configs/data/alpaca_200.json"), "template": "Alpaca", "size": size}


# --------------------------------------------------------------------------------------------------
# Safe-RLHF: mix the raw advantages, then whiten once
# --------------------------------------------------------------------------------------------------


def hand_rollout() -> Rollout:
    """Two episodes: 2 response tokens and 1 (the second position is padding, with junk values)."""
    d = torch.float64
    rollout = Rollout(
        sequences=torch.tensor([[5, 6, 7], [5, 8, 0]]),
        attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        response_mask=torch.tensor([[True, True], [True, False]]),
        has_eos=torch.tensor([True, True]),
        prompt_length=1,
    )
    rollout["old_logprobs"] = torch.tensor([[-1.0, -2.0], [-1.5, 0.0]], dtype=d)
    rollout["ref_logprobs"] = torch.tensor([[-1.2, -2.0], [-1.0, 0.0]], dtype=d)  # k1 KL: 0.2, 0 | -0.5
    rollout["old_values"] = torch.tensor([[0.5, 0.25], [1.0, 9.0]], dtype=d)
    rollout["old_cost_values"] = torch.tensor([[0.0, 1.0], [0.5, 9.0]], dtype=d)
    rollout["scores"] = torch.tensor([1.0, 3.0], dtype=d)
    rollout["costs"] = torch.tensor([2.0, 0.0], dtype=d)
    return rollout


def whiten_by_hand(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)  # unbiased, as masked_whiten
    return [(v - mean) / math.sqrt(var + 1e-8) for v in values]


@pytest.mark.parametrize("whiten", [True, False])
def test_safe_rlhf_mixes_raw_advantages_then_whitens_once(whiten: bool) -> None:
    module = SafeRLHFModule(
        model_name_or_path="tiny-qwen2",
        reward_functions=E_SHARE,
        cost_functions=[RewardSpec("response_length")],
        lambda_init=2.0,
        lambda_update_delay_steps=10**9,  # lambda stays 2
        kl_coef=0.5,
        gamma=1.0,
        lam=1.0,  # GAE(1): A_t = sum of the rewards from t on - V_t
        whiten_advantages=whiten,
    )
    rollout = hand_rollout()
    module.compute_advantages(rollout, MetricAccumulator())

    # reward stream: -0.5 * KL per token, score on the last token; cost stream: +0.5 * KL, cost at the end
    #   rewards  [-0.1, 1.0] | [0.25 + 3.0]        costs  [0.1, 2.0] | [-0.25 + 0.0]
    a_r = [(-0.1 + 1.0) - 0.5, 1.0 - 0.25, 3.25 - 1.0]  # [0.4, 0.75, 2.25]
    a_c = [(0.1 + 2.0) - 0.0, 2.0 - 1.0, -0.25 - 0.5]  # [2.1, 1.0, -0.75]
    mixed = [(r - 2.0 * c) / (1.0 + 2.0) for r, c in zip(a_r, a_c)]
    expected = whiten_by_hand(mixed) if whiten else mixed
    mask = rollout.response_mask
    torch.testing.assert_close(rollout["advantages"][mask], torch.tensor(expected, dtype=torch.float64))
    assert float(rollout["advantages"][1, 1]) == 0.0
    torch.testing.assert_close(rollout["reward_advantages"][mask], torch.tensor(a_r, dtype=torch.float64))
    torch.testing.assert_close(rollout["cost_advantages"][mask], torch.tensor(a_c, dtype=torch.float64))
    # the critics' targets are the raw returns R = A + V of each stream
    torch.testing.assert_close(rollout["returns"][mask], torch.tensor([0.9, 1.0, 3.25], dtype=torch.float64))
    torch.testing.assert_close(
        rollout["cost_returns"][mask], torch.tensor([2.1, 2.0, -0.25], dtype=torch.float64)
    )


# --------------------------------------------------------------------------------------------------
# log-probs of bf16 logits are float32, never cast back
# --------------------------------------------------------------------------------------------------


def temperature_kwargs(temperature: float) -> dict[str, float]:
    """No keyword at temperature 1, so the same call checks the numbers of code without the keyword."""
    return {} if temperature == 1.0 else {"temperature": temperature}


def reference_log_probs(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    z = logits.double() / temperature
    return z.log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def reference_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = (logits.double() / temperature).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_of_bf16_is_float32_and_exact(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 9, 301, generator=g) * 4).to(torch.bfloat16)  # bf16 values, exact in float64
    index = torch.randint(0, 301, (3, 9), generator=g)
    x = logits.clone().requires_grad_(True)
    out = selective_log_softmax(x, index, chunk_size=4, **temperature_kwargs(temperature))
    assert out.dtype == torch.float32
    want = reference_log_probs(logits, index, temperature)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-5)
    # the gradient stays in the logits' dtype and is the float64 gradient rounded to bf16
    weights = torch.randn(3, 9, generator=g)
    (out * weights).sum().backward()
    z = logits.double().requires_grad_(True)
    (reference_log_probs(z, index, temperature) * weights.double()).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.double(), z.grad, rtol=1e-2, atol=1e-3)
    # a causal-shift slice (not viewable as rows) and a mask of positions go through the same float32 path
    masked = selective_log_softmax(logits[:, :-1], index[:, 1:], mask=index[:, 1:] % 2 == 0)
    assert masked.dtype == torch.float32
    picked = index[:, 1:] % 2 == 0
    torch.testing.assert_close(
        masked[picked].double(), reference_log_probs(logits[:, :-1], index[:, 1:])[picked], rtol=0, atol=2e-5
    )
    entropy = entropy_from_logits(logits, **temperature_kwargs(temperature))
    assert entropy.dtype == torch.float32
    torch.testing.assert_close(entropy.double(), reference_entropy(logits, temperature), rtol=0, atol=2e-5)


def test_selective_log_softmax_temperature_gradient_fp64() -> None:
    """The fused backward with a temperature: in place (all rows) and on masked rows."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.randint(0, 7, (2, 3), generator=g)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    for kwargs in ({}, {"mask": mask}):
        assert torch.autograd.gradcheck(
            lambda t, kw=kwargs: selective_log_softmax(t, index, chunk_size=2, temperature=0.7, **kw), (x,)
        )
    torch.testing.assert_close(
        selective_log_softmax(x, index, temperature=0.7),
        reference_log_probs(x, index, 0.7),
        rtol=0,
        atol=1e-12,
    )


@pytest.fixture(scope="module")
def bf16_qwen2() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path("tiny-qwen2"), torch_dtype=torch.bfloat16
    ).eval()


def test_log_prob_callers_keep_float32_for_a_bf16_model(bf16_qwen2: torch.nn.Module) -> None:
    """``sequence_log_probs``, ``causal_lm_log_probs`` (sparse LM head) and the rollout log-probs (with the
    sampling temperature) of a bf16 model all equal float64 log-softmaxes of its bf16 logits."""
    model = bf16_qwen2
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 9:] = -100
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        assert logits.dtype == torch.bfloat16
        shifted = labels[:, 1:]
        mask = shifted != -100
        want = reference_log_probs(logits[:, :-1], shifted.clamp(min=0)) * mask
        for temperature in (1.0, 0.7):
            want_t = reference_log_probs(logits[:, :-1], shifted.clamp(min=0), temperature) * mask
            full = sequence_log_probs(logits, labels, **temperature_kwargs(temperature))
            sparse = causal_lm_log_probs(model, {"input_ids": ids}, labels, temperature=temperature)
            for got in (full, sparse):
                assert got.token_log_probs.dtype == got.sum.dtype == torch.float32
                torch.testing.assert_close(got.token_log_probs.double(), want_t, rtol=0, atol=2e-5)
                torch.testing.assert_close(got.sum.double(), want_t.sum(-1), rtol=0, atol=1e-4)
        assert torch.equal(want.ne(0), mask)

    module = PPOModule(
        model_name_or_path="tiny-qwen2",
        reward_functions=E_SHARE,
        generation=GenerationConfig(max_new_tokens=4, temperature=0.7, do_sample=True),
    )
    prompt_length = 5
    rollout = Rollout(
        sequences=ids,
        attention_mask=torch.ones_like(ids),
        response_mask=torch.ones(2, ids.shape[1] - prompt_length, dtype=torch.bool),
        has_eos=torch.tensor([True, True]),
        prompt_length=prompt_length,
    )
    with torch.no_grad():
        logprobs, entropy = module.response_log_probs(model, rollout, with_entropy=True)
        inputs = rollout.model_inputs()
        head = model(**inputs, use_cache=False).logits[:, prompt_length - 1 : -1]
    assert logprobs.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(
        logprobs.double(), reference_log_probs(head, rollout.response_ids, 0.7), rtol=0, atol=2e-5
    )
    torch.testing.assert_close(entropy.double(), reference_entropy(head, 0.7), rtol=0, atol=2e-5)


# --------------------------------------------------------------------------------------------------
# ptx: once per optimizer update, and from the datamodule
# --------------------------------------------------------------------------------------------------


class CountingPPO(PPOModule):
    """PPO that counts its ptx forwards and optimizer updates per rollout."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ptx_forwards = 0
        self.updates = 0

    def ptx_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        self.ptx_forwards += 1
        return super().ptx_loss(batch)

    def optimizer_update(self, stats: MetricAccumulator) -> None:
        self.updates += 1
        super().optimizer_update(stats)


def ppo_kwargs(**kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        model_name_or_path="tiny-qwen2",
        reward_functions=E_SHARE,
        generation=GenerationConfig(max_new_tokens=4),
        optim=OptimConfig(lr=1e-3, warmup_steps=0, scheduler="constant"),
        kl_coef=0.0,
        sample_log_interval=0,
    )
    args.update(kwargs)
    return args


def test_ptx_enters_each_optimizer_update_once(repo_path: Any) -> None:
    pl.seed_everything(0)
    prompts = TextToTextDataModule(
        model_name_or_path="tiny-qwen2",
        train=alpaca(repo_path, 8),
        max_length=48,
        batch_size=8,
        kind="prompt_only",
    )
    supervised = TextToTextDataModule(
        model_name_or_path="tiny-qwen2",
        train=alpaca(repo_path, 4),
        max_length=48,
        batch_size=2,
        kind="supervised",
    )
    prompts.setup("fit")
    supervised.setup("fit")
    module = CountingPPO(
        **ppo_kwargs(ptx_coef=0.5, ppo_epochs=2, num_mini_batches=4, gradient_accumulation_steps=2)
    )
    assert module.updates_per_rollout() == 4
    rec = Recorder()
    trainer = quiet_trainer(max_steps=module.updates_per_rollout(), callbacks=[rec])
    trainer.fit(
        module, train_dataloaders={"prompt": prompts.train_dataloader(), "ptx": supervised.train_dataloader()}
    )
    assert len(rec.rows) == 1  # one rollout
    assert module.updates == 4
    assert module.ptx_forwards == module.updates  # not once per minibatch (8)
    assert 0 < rec.rows[-1]["train/ptx_loss"] < 20


def test_datamodule_ptx_spec_feeds_a_ptx_loss(repo_path: Any) -> None:
    pl.seed_everything(0)
    dm = TextToTextDataModule(
        model_name_or_path="tiny-qwen2",
        train=alpaca(repo_path, 8),
        ptx=alpaca(repo_path, 6),
        ptx_batch_size=3,
        max_length=48,
        batch_size=4,
    )
    module = CountingPPO(**ppo_kwargs(ptx_coef=0.5))
    rec = Recorder()
    trainer = quiet_trainer(max_steps=2, callbacks=[rec])
    trainer.fit(module, dm)
    assert len(rec.rows) == 2 and module.ptx_forwards == 2
    ptx = [row["train/ptx_loss"] for row in rec.rows]
    assert all(0 < v < 20 for v in ptx) and ptx[0] != ptx[1]  # two different supervised batches


def test_ptx_stream_cycles_under_the_prompt_epochs_and_resumes(repo_path: Any) -> None:
    """The prompts set the epoch; the ptx stream runs through its own epochs; a resumed loader pairs the
    same batches as the uninterrupted one."""
    dm = TextToTextDataModule(
        model_name_or_path="tiny-qwen2",
        train=alpaca(repo_path, 8),
        ptx=alpaca(repo_path, 6),
        ptx_batch_size=4,  # 2 batches per ptx epoch (4 + 2 rows)
        max_length=48,
        batch_size=3,  # 3 prompt batches per epoch
        kind="prompt_only",
    )
    dm.setup("fit")

    def run(epochs: range, load: dict[str, int] | None = None) -> list[tuple[list[int], list[int]]]:
        loader = dm.train_dataloader()
        assert len(loader) == 3
        if load is not None:
            loader.load_state_dict(load)
        pairs = []
        for epoch in epochs:
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                assert set(batch) == {"prompt", "ptx"} and "labels" in batch["ptx"]
                assert "labels" not in batch["prompt"]
                pairs.append(
                    (
                        batch["prompt"]["extra"]["sample_index"].tolist(),
                        batch["ptx"]["extra"]["sample_index"].tolist(),
                    )
                )
        return pairs

    straight = run(range(3))
    assert len(straight) == 9
    ptx_batches = [p for _, p in straight]
    sampler = dm.train_dataloader().auxiliary.sampler
    expected = []
    for ptx_epoch in range(5):  # 9 batches = 4.5 ptx epochs, each its own shuffle
        sampler.set_epoch(ptx_epoch)
        order = list(iter(sampler))
        expected += [order[:4], order[4:]]
    assert ptx_batches == expected[:9]
    assert expected[0] != expected[2]  # the ptx epochs really are reshuffled
    # resume after 1 batch of epoch 1 (global batch 4): the rest pairs as in the straight run
    assert run(range(1, 3), load={"epoch": 1, "batches": 1}) == straight[4:]


def test_ptx_spec_needs_prompt_only_training(repo_path: Any) -> None:
    dm = TextToTextDataModule(
        model_name_or_path="tiny-qwen2",
        train=alpaca(repo_path, 4),
        ptx=alpaca(repo_path, 4),
        kind="supervised",
    )
    with pytest.raises(ValueError, match="data.ptx"):
        dm.setup("fit")


def test_grpo_refuses_a_ptx_stream(repo_path: Any) -> None:
    dm = TextToTextDataModule(
        model_name_or_path="tiny-qwen2", train=alpaca(repo_path, 4), ptx=alpaca(repo_path, 4), batch_size=2
    )
    module = GRPOModule(model_name_or_path="tiny-qwen2", reward_functions=E_SHARE, sample_log_interval=0)
    with pytest.raises(ValueError, match="GRPO has no ptx loss"):
        quiet_trainer(max_steps=1).fit(module, dm)


# --------------------------------------------------------------------------------------------------
# validation metrics over two ranks
# --------------------------------------------------------------------------------------------------


def test_unique_sample_sums_count_each_index_once() -> None:
    from aa_lightning.algorithms.eval_metrics import UniqueSampleSums, sample_indices

    sums = UniqueSampleSums(["a", "b"])
    sums.update(torch.tensor([0, 2]), {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([10.0, 30.0])})
    sums.update(
        torch.tensor([1, 0]), {"a": torch.tensor([2.0, 1.0]), "b": torch.tensor([20.0, 10.0])}
    )  # 0 again
    sums.update(
        torch.tensor([-1, -1]), {"a": torch.tensor([5.0, 5.0]), "b": torch.tensor([0.0, 0.0])}
    )  # unindexed
    out = sums.compute()
    assert float(out["a"]) == 1 + 3 + 2 + 5 + 5 and float(out["b"]) == 60 and float(out["rows"]) == 5
    assert sample_indices({"extra": {"sample_index": torch.tensor([4, 5])}}, 2).tolist() == [4, 5]
    assert sample_indices({"input_ids": torch.zeros(3, 1)}, 3).tolist() == [-1, -1, -1]


_VALIDATE_ON_TWO_RANKS = """
import json, sys
from pathlib import Path

import torch

torch.set_num_threads(1)
import lightning.pytorch as pl
from torch.utils.data import DataLoader

from aa_lightning.algorithms import GenerationConfig, PPOModule, RewardModule, SFTModule
from aa_lightning.data import TextToTextDataModule
from aa_lightning.rewards import RewardSpec, register_reward

DATA = Path({data_dir!r})


@register_reward("prompt_chars")
def prompt_chars(prompt, response, meta):  # differs from prompt to prompt (a random policy's text would not)
    return len(prompt) / 100.0
OUT = Path({out_dir!r})


class SeenRows(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        prompts = batch.get("prompt", batch)
        self.rows += prompts["extra"]["sample_index"].tolist()


def validate(module, val, kind):
    pl.seed_everything(0)
    dm = TextToTextDataModule(
        model_name_or_path="tiny-qwen2", val=val, max_length=64, batch_size=1, eval_batch_size=1, kind=kind
    )
    seen = SeenRows()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[seen],
    )
    trainer.validate(module, dm, verbose=False)
    logged = {{k: float(v) for k, v in trainer.callback_metrics.items()}}
    rows = DataLoader(dm.datasets["val"], batch_size=1, collate_fn=dm.build_collator(kind))  # every row once
    return trainer.global_rank, logged, seen.rows, rows


def main():
    out = {{}}
    module = SFTModule(model_name_or_path="tiny-qwen2")
    rank, logged, seen, rows = validate(module, {{"path": str(DATA / "alpaca_val_32.json"), "template": "Alpaca", "size": 3}}, "supervised")
    with torch.no_grad():
        nll, tokens = zip(*(module.token_nll(batch) for batch in rows))
    out["sft"] = dict(logged=logged, seen=seen, expected={{"val/loss": float(sum(nll) / sum(tokens))}}, rows=len(nll))

    module = RewardModule(model_name_or_path="tiny-qwen2", new_score_head=True)
    rank, logged, seen, rows = validate(module, {{"path": str(DATA / "hh_rlhf_val_32.jsonl"), "template": "HH-RLHF", "size": 3}}, "preference")
    with torch.no_grad():
        stats = [module.compute_loss(batch, "val")[1] for batch in rows]
    expected = {{f"val/{{k}}": float(torch.stack([s[k].float().mean() for s in stats]).mean()) for k in ("loss", "accuracy", "margin")}}
    out["rm"] = dict(logged=logged, seen=seen, expected=expected, rows=len(stats))

    module = PPOModule(
        model_name_or_path="tiny-qwen2", reward_functions=[RewardSpec("prompt_chars")],
        generation=GenerationConfig(max_new_tokens=6), sample_log_interval=0,
    )
    rank, logged, seen, rows = validate(module, {{"path": str(DATA / "alpaca_val_32.json"), "template": "Alpaca", "size": 3}}, "prompt_only")
    with torch.no_grad():
        scores = [module.compute_scores(module.generate_rollout(batch, do_sample=False))[0] for batch in rows]
    expected = {{"val/score": float(torch.cat(scores).mean())}}
    out["ppo"] = dict(logged=logged, seen=seen, expected=expected, rows=len(scores))
    (OUT / f"rank{{rank}}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
"""


def test_validation_metrics_are_means_over_all_rows_on_two_ranks(tmp_path: Path, repo_path: Any) -> None:
    """3 validation rows on 2 DDP ranks: Lightning's sampler gives rank 0 rows {0, 2} and rank 1 rows {1, 0}
    (row 0 repeated so both run 2 batches). SFT's val/loss, the reward model's val/* and PPO's val/score
    must be the means over the 3 distinct rows, as computed row by row in the same process."""
    script = tmp_path / "validate_two_ranks.py"
    script.write_text(
        textwrap.dedent(_VALIDATE_ON_TWO_RANKS).format(
            data_dir=repo_path("configs", "data"), out_dir=str(tmp_path)
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a hang is killed together with the rank-1 child Lightning starts
    )
    try:
        output, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"2-process validation hung:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in ("sft", "rm", "ppo"):
        results = [r[name] for r in ranks]
        assert results[0]["rows"] == 3, name
        assert sorted(results[0]["seen"]) == [0, 2] and sorted(results[1]["seen"]) == [0, 1], name
        for key, want in results[0]["expected"].items():
            for rank, res in enumerate(results):
                assert res["logged"][key] == pytest.approx(want, rel=1e-5, abs=1e-6), (name, key, rank)
