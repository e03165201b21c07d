"""Length-grouped training batches (``group_by_length``): every sample once, less padding, exact resume."""

from __future__ import annotations

import math
import random

from aa_lightning.data.loader import LengthGroupedSampler, ResumableSampler


def _lengths(n: int = 203, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 300) for _ in range(n)]


def _padded(order: list[int], lengths: list[int], batch: int) -> int:
    return sum(
        max(lengths[i] for i in order[s : s + batch]) * len(order[s : s + batch])
        for s in range(0, len(order), batch)
    )


def test_every_sample_once_and_less_padding() -> None:
    lengths = _lengths()
    data = list(range(len(lengths)))
    grouped = LengthGroupedSampler(data, lengths, batch_size=8, seed=3, mega_batches=4)
    plain = ResumableSampler(data, shuffle=True, seed=3)
    order = list(grouped)
    assert sorted(order) == data
    assert _padded(order, lengths, 8) < 0.8 * _padded(list(plain), lengths, 8)
    # inside a mega-batch (8 x 4 samples) the lengths run long to short
    first = [lengths[i] for i in order[:32]]
    assert first == sorted(first, reverse=True)


def test_order_depends_on_seed_and_epoch_only() -> None:
    lengths = _lengths()
    data = list(range(len(lengths)))
    a = LengthGroupedSampler(data, lengths, batch_size=4, seed=1)
    b = LengthGroupedSampler(data, lengths, batch_size=4, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b) and sorted(a) == data


def test_resume_skips_the_consumed_prefix() -> None:
    lengths = _lengths()
    data = list(range(len(lengths)))
    sampler = LengthGroupedSampler(data, lengths, batch_size=4, seed=5)
    full = list(sampler)
    sampler.skip_epoch, sampler.skip_samples = 0, 12
    assert list(sampler) == full[12:]
    assert list(sampler) == full  # the skip applies once


def test_ranks_split_the_epoch() -> None:
    lengths = _lengths(n=101)
    data = list(range(len(lengths)))
    parts = []
    for rank in range(2):
        sampler = LengthGroupedSampler(data, lengths, batch_size=4, seed=0)
        sampler.num_replicas, sampler.rank = 2, rank
        sampler.num_samples = math.ceil(len(data) / 2)
        sampler.total_size = sampler.num_samples * 2
        parts.append(list(sampler))
    assert len(parts[0]) == len(parts[1]) == 51
    assert set(parts[0]) | set(parts[1]) == set(data)  # one sample is repeated to even out the ranks


def test_datamodule_flag_groups_batches(repo_path) -> None:
    from aa_lightning.data import TextToTextDataModule

    def batches(group: bool) -> list:
        dm = TextToTextDataModule(
            model_name_or_path="tiny-qwen2",
            train={"path": repo_path("configs", "data", "alpaca_200.json"), "template": "Alpaca", "size": 64},
            kind="supervised",
            max_length=128,
            batch_size=8,
            group_by_length=group,
        )
        dm.setup("fit")
        return list(dm.train_dataloader())

    grouped, plain = batches(True), batches(False)
    assert sum(int(b["attention_mask"].sum()) for b in grouped) == sum(
        int(b["attention_mask"].sum()) for b in plain
    )
    assert sum(b["input_ids"].numel() for b in grouped) < sum(b["input_ids"].numel() for b in plain)
