"""padding_free: packed forwards give the padded forward's loss and gradients (SFT, DPO, reward model).

Real batches from the datamodule (rows of different lengths, so every batch has pad positions), two copies of
the same module, one with ``padding_free=True``: losses and every parameter gradient must agree to float32
rounding, and the packed forward must really have run on fewer positions than the padded one.
"""

from __future__ import annotations

import pytest
import torch

from aa_lightning.algorithms import DPOModule, SFTModule
from aa_lightning.algorithms.reward import RewardModule
from aa_lightning.data import DataSpec, TextToTextDataModule
from aa_lightning.models.packing import PACKED_SDPA, pack_rows, text_backbone


def first_batch(repo_path, template: str, path: tuple[str, ...], kind: str, max_length: int = 96) -> dict:
    spec = DataSpec(repo_path(*path), template, size=6)
    dm = TextToTextDataModule(
        "tiny-qwen2", train=spec, kind=kind, max_length=max_length, batch_size=3, shuffle=False
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert (batch["attention_mask"] == 0).any(), "the test needs a batch with padding"
    return batch


def positions_seen(module) -> list[int]:
    """Record the sequence length each backbone layer stack runs on (padded: N*L rows; packed: 1 x T)."""
    seen: list[int] = []
    backbone = text_backbone(module.model)
    backbone.layers[0].register_forward_hook(lambda m, a, out: seen.append(a[0].shape[0] * a[0].shape[1]))
    return seen


def compare(make, batch, loss_of) -> None:
    torch.manual_seed(0)
    padded = make(False)
    padded.configure_model()
    packed = make(True)
    packed.configure_model()
    packed.model.load_state_dict(padded.model.state_dict())  # a fresh score head is drawn per module
    assert packed.model.config._attn_implementation == PACKED_SDPA
    padded_seen, packed_seen = positions_seen(padded), positions_seen(packed)
    losses = []
    for module in (padded, packed):
        module.model.train()
        loss = loss_of(module, batch)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in padded.model.named_parameters() if p.grad is not None}
    assert grads
    for name, param in packed.model.named_parameters():
        if name in grads:
            scale = grads[name].abs().max().clamp(min=1e-6)
            assert (param.grad - grads[name]).abs().max() / scale < 1e-4, name
    real = int(batch["attention_mask"].sum())
    assert packed_seen and set(packed_seen) == {real}
    assert padded_seen and padded_seen[0] == batch["attention_mask"].numel() > real


def test_sft_padding_free_equals_padded(repo_path) -> None:
    batch = first_batch(repo_path, "Alpaca", ("configs", "data", "alpaca_200.json"), "supervised")
    compare(
        lambda pf: SFTModule("tiny-qwen2", dtype="float32", padding_free=pf),
        batch,
        lambda m, b: m.training_step(b, 0),
    )


def test_dpo_padding_free_equals_padded(repo_path) -> None:
    batch = first_batch(repo_path, "HH-RLHF", ("benchmarks", "data", "hh_rlhf_256.jsonl"), "preference", 1024)
    compare(
        lambda pf: DPOModule("tiny-qwen2", dtype="float32", padding_free=pf, beta=0.1),
        batch,
        lambda m, b: m.compute_loss(b, "train")[0],
    )


def test_reward_model_padding_free_equals_padded(repo_path) -> None:
    batch = first_batch(repo_path, "HH-RLHF", ("benchmarks", "data", "hh_rlhf_256.jsonl"), "preference", 1024)
    compare(
        lambda pf: RewardModule("tiny-qwen2", dtype="float32", padding_free=pf, new_score_head=True),
        batch,
        lambda m, b: m.compute_loss(b, "train")[0],
    )


def test_pack_rows_by_hand() -> None:
    """Two right-padded rows (lengths 3 and 1): tokens, positions, flat indices and boundaries."""
    ids = torch.tensor([[5, 6, 7], [8, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    packed = pack_rows(ids, mask)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0]]
    assert packed["index"].tolist() == [0, 1, 2, 3]
    assert packed["cu_seq_lens"].tolist() == [0, 3, 4] and packed["max_length"] == 3


def test_generation_and_unpadded_forwards_are_untouched(repo_path) -> None:
    """generate (KV cache) runs the ordinary path and gives the same tokens as a model without the hooks."""
    plain = SFTModule("tiny-qwen2", dtype="float32")
    plain.configure_model()
    packed = SFTModule("tiny-qwen2", dtype="float32", padding_free=True)
    packed.configure_model()
    packed.model.load_state_dict(plain.model.state_dict())
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]])
    mask = (ids != 0).long()
    outs = [
        m.model.eval().generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        for m in (plain, packed)
    ]
    assert torch.equal(outs[0], outs[1])


def test_multimodal_models_refuse_padding_free() -> None:
    with pytest.raises(ValueError, match="text-only"):
        module = SFTModule("tiny-llava", padding_free=True)
        module.configure_model()


def test_a_row_without_tokens_packs_to_an_empty_segment() -> None:
    """A row whose mask is all zeros adds no token and a zero-length segment (skipped by the attention)."""
    ids = torch.tensor([[5, 6, 7], [0, 0, 0], [8, 0, 0]])
    mask = (ids != 0).long()
    packed = pack_rows(ids, mask)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8]]
    assert packed["index"].tolist() == [0, 1, 2, 6]
    assert packed["cu_seq_lens"].tolist() == [0, 3, 3, 4]
