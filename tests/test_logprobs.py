"""Tests for aa_lightning.algorithms.logprobs (expected values computed by hand)."""

from __future__ import annotations

import math

import pytest
import torch

from aa_lightning.algorithms.logprobs import (
    entropy_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    selective_log_softmax,
    sequence_log_probs,
)


def _naive(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


# ------------------------------------------------------------------ selective_log_softmax


def test_selective_log_softmax_hand_values() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    index = torch.tensor([1, 0])
    out = selective_log_softmax(logits, index)
    expected = [math.log(0.5), 1.0 - math.log(math.exp(1.0) + math.exp(2.0))]
    torch.testing.assert_close(out, torch.tensor(expected))
    # 1-D input (a single row)
    out1 = selective_log_softmax(torch.tensor([1.0, 2.0, 3.0]), torch.tensor(2))
    expected1 = 3.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(3.0))
    assert out1.shape == () and math.isclose(out1.item(), expected1, rel_tol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, 512])
def test_selective_log_softmax_matches_naive_fp32_with_grads(chunk_size: int) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 6, 17, generator=g) * 3
    index = torch.randint(0, 17, (3, 5), generator=g)
    weights = torch.randn(3, 5, generator=g)

    a = base.clone().requires_grad_(True)
    b = base.clone().requires_grad_(True)
    # non-contiguous causal slice exercises the no-copy path
    out = selective_log_softmax(a[:, :-1], index, chunk_size=chunk_size)
    ref = _naive(b[:, :-1], index)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_selective_log_softmax_bf16_matches_naive() -> None:
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(4, 7, 33, generator=g) * 2).to(torch.bfloat16)
    index = torch.randint(0, 33, (4, 7), generator=g)
    a = base.clone().requires_grad_(True)
    out = selective_log_softmax(a, index, chunk_size=5)
    assert out.dtype == torch.float32  # never cast back to bf16 (issue 10)
    ref32 = _naive(base.float(), index)
    torch.testing.assert_close(out.float(), ref32, rtol=2e-2, atol=5e-2)
    out.float().sum().backward()
    b = base.clone().requires_grad_(True)
    _naive(b, index).float().sum().backward()
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=2e-2, atol=2e-2)


def test_selective_log_softmax_gradcheck_fp64() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.randint(0, 5, (2, 3), generator=g)
    assert torch.autograd.gradcheck(lambda t: selective_log_softmax(t, index, chunk_size=2), (x,))


# ------------------------------------------------------------------ sequence_log_probs


def test_sequence_log_probs_hand_values_with_padding() -> None:
    logits = torch.zeros(3, 3, 3)
    logits[0, 1] = torch.tensor([1.0, 2.0, 3.0])
    logits[0, 2] = torch.tensor([9.0, -9.0, 9.0])  # last position predicts nothing
    logits[1, 0] = torch.tensor([0.0, 1.0, 0.0])
    labels = torch.tensor([[-100, 2, 0], [-100, 1, -100], [-100, -100, -100]])
    out = sequence_log_probs(logits, labels)

    lp00 = math.log(1.0 / 3.0)
    lp01 = 1.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(3.0))
    lp10 = 1.0 - math.log(2.0 + math.exp(1.0))
    torch.testing.assert_close(out.sum, torch.tensor([lp00 + lp01, lp10, 0.0]))
    torch.testing.assert_close(out.mean, torch.tensor([(lp00 + lp01) / 2.0, lp10, 0.0]))
    assert out.token_count.tolist() == [2, 1, 0]
    assert out.mask.tolist() == [[True, True], [True, False], [False, False]]
    torch.testing.assert_close(out.token_log_probs, torch.tensor([[lp00, lp01], [lp10, 0.0], [0.0, 0.0]]))


def test_sequence_log_probs_bf16_returns_float32() -> None:
    logits = torch.zeros(1, 3, 4, dtype=torch.bfloat16)
    labels = torch.tensor([[0, 1, 2]])
    out = sequence_log_probs(logits, labels)
    assert out.sum.dtype == torch.float32
    torch.testing.assert_close(out.sum, torch.tensor([2.0 * math.log(0.25)]), rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------ masked reductions


def test_masked_reductions_hand_values() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert masked_sum(values, mask).item() == 10.0
    assert masked_mean(values, mask).item() == 2.5
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(masked_sum(values, mask, dim=0), torch.tensor([5.0, 2.0, 3.0]))
    # deviations from 2.5: squares 2.25, 0.25, 0.25, 2.25 -> 5.0
    assert math.isclose(masked_var(values, mask, unbiased=False).item(), 5.0 / 4.0, rel_tol=1e-6)
    assert math.isclose(masked_var(values, mask).item(), 5.0 / 3.0, rel_tol=1e-6)


def test_masked_mean_empty_rows_are_zero() -> None:
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[False, False], [True, False]])
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), torch.tensor([0.0, 3.0]))
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_masked_whiten_hand_values() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -7.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    std = math.sqrt(5.0 / 3.0 + 1e-8)
    expected = torch.tensor([[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(values, mask), expected)
    shifted = torch.tensor(
        [[-1.5 / std + 2.5, -0.5 / std + 2.5, 0.5 / std + 2.5], [1.5 / std + 2.5, 0.0, 0.0]]
    )
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False), shifted)


# ------------------------------------------------------------------ entropy


def test_entropy_hand_values() -> None:
    # uniform over 4 -> log 4; p = (1/4, 3/4) -> -(1/4 log 1/4 + 3/4 log 3/4)
    out = entropy_from_logits(torch.zeros(1, 4))
    assert math.isclose(out.item(), math.log(4.0), rel_tol=1e-6)
    out2 = entropy_from_logits(torch.tensor([0.0, math.log(3.0)]))
    assert math.isclose(out2.item(), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_matches_naive_chunked(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 9, 13, generator=g) * 2).to(dtype)
    out = entropy_from_logits(logits[:, :-1], chunk_size=3)
    x = logits[:, :-1].float()
    naive = -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)
    torch.testing.assert_close(out.float(), naive, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ masked / model-level log-probs


def test_selective_log_softmax_mask_matches_naive_with_grads() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 5, 13, generator=g) * 2
    index = torch.randint(0, 13, (3, 5), generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    weights = torch.randn(3, 5, generator=g)
    a = base.clone().requires_grad_(True)
    b = base.clone().requires_grad_(True)
    out = selective_log_softmax(a, index, chunk_size=2, mask=mask)
    ref = torch.where(mask, _naive(b, index), torch.zeros(()))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert (out[~mask] == 0).all()
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    assert (a.grad[~mask] == 0).all()  # unmasked rows get no gradient at all


def test_sequence_log_probs_grads_match_naive() -> None:
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 6, 9, generator=g)
    labels = torch.randint(0, 9, (2, 6), generator=g)
    labels[0, :3] = -100
    labels[1, 4:] = -100
    a = base.clone().requires_grad_(True)
    out = sequence_log_probs(a, labels, chunk_size=3)
    b = base.clone().requires_grad_(True)
    shifted = labels[:, 1:]
    lp = _naive(b[:, :-1], shifted.clamp(min=0)) * (shifted != -100)
    torch.testing.assert_close(out.sum, lp.sum(-1))
    (out.sum * torch.tensor([1.5, -2.0])).sum().backward()
    (lp.sum(-1) * torch.tensor([1.5, -2.0])).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


class _RecordingHead(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows_seen = x.shape[:-1]
        return super().forward(x)


class _ToyLM(torch.nn.Module):
    """A causal toy LM with an HF-style ``get_output_embeddings``; ``extra`` prepends positions the labels
    do not have (like media features), so the head cannot be restricted to labelled positions."""

    def __init__(self, extra: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(11, 6)
        self.head = _RecordingHead(6, 11)
        self.extra = extra

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, use_cache: bool = False
    ):
        hidden = self.embed(input_ids).cumsum(dim=1).tanh()
        if self.extra:
            hidden = torch.cat([hidden[:, :1].repeat(1, self.extra, 1), hidden], dim=1)
        logits = self.head(hidden)[:, self.extra :]
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("extra", [0, 1])
def test_causal_lm_log_probs_matches_full_logits(extra: int) -> None:
    from aa_lightning.algorithms.logprobs import causal_lm_log_probs

    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]])
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 8, -100, -100]])
    model = _ToyLM(extra)
    out = causal_lm_log_probs(model, {"input_ids": ids}, labels)
    assert tuple(model.head.rows_seen) == ((5,) if not extra else (2, 6))  # only the 5 scored positions
    out.sum.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = sequence_log_probs(model(ids).logits, labels)
    ref.sum.sum().backward()
    torch.testing.assert_close(out.sum, ref.sum)
    torch.testing.assert_close(out.token_log_probs, ref.token_log_probs)
    assert out.token_count.tolist() == [3, 2] and torch.equal(out.mask, ref.mask)
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want)
