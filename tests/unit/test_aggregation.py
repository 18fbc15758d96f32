"""Tests of megatron_hapo.algos.aggregation: the four modes and the exact global denominator."""

from __future__ import annotations

import pytest
import torch
from helpers import F64, SETTINGS
from hypothesis import given
from hypothesis import strategies as st

from megatron_hapo.algos import AGGREGATION_MODES, aggregate_loss, aggregation_terms

# Two sequences (3 and 2 valid tokens), an empty third one; masked positions carry 100 to catch leaks.
LOSS = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 8.0, 100.0, 100.0], [100.0, 100.0, 100.0, 100.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]).bool()


@pytest.mark.parametrize(
    ("mode", "expected", "terms"),
    [
        ("token-mean", 3.6, (18.0, 5.0)),  # (1 + 2 + 3 + 4 + 8) / 5 valid tokens
        ("seq-mean-token-mean", 4.0, (8.0, 2.0)),  # (6/3 + 12/2) / 2 non-empty sequences = (2 + 6) / 2
        ("seq-mean-token-sum", 9.0, (18.0, 2.0)),  # (6 + 12) / 2 non-empty sequences
        ("token-sum", 18.0, (18.0, 1.0)),  # 6 + 12
    ],
)
def test_modes_hand_values(mode, expected, terms):
    assert aggregate_loss(LOSS, MASK, mode).item() == pytest.approx(expected, abs=1e-12)
    numerator, denominator = aggregation_terms(LOSS, MASK, mode)
    assert (numerator.item(), denominator.item()) == pytest.approx(terms)


def test_default_mode_is_token_mean():
    assert aggregate_loss(LOSS, MASK).item() == pytest.approx(3.6)


def test_empty_sequences_are_skipped_in_seq_modes():
    # without the empty third row the result is the same (departure: the published code would divide 0 by 0)
    for mode in AGGREGATION_MODES:
        assert aggregate_loss(LOSS, MASK, mode).item() == pytest.approx(aggregate_loss(LOSS[:2], MASK[:2], mode).item())


def test_single_token_sequences():
    loss = torch.tensor([[3.0, 9.0], [5.0, 9.0]], dtype=F64)
    mask = torch.tensor([[1, 0], [1, 0]]).bool()
    for mode, expected in (
        ("token-mean", 4.0),
        ("seq-mean-token-mean", 4.0),
        ("seq-mean-token-sum", 4.0),
        ("token-sum", 8.0),
    ):
        assert aggregate_loss(loss, mask, mode).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_empty_mask_gives_zero_not_nan_with_a_graph(mode):
    loss = torch.randn(2, 3, dtype=F64, requires_grad=True)
    out = aggregate_loss(loss, torch.zeros(2, 3, dtype=torch.bool), mode)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(loss.grad, torch.zeros(2, 3, dtype=F64))
    zero_global = aggregate_loss(loss, torch.zeros(2, 3, dtype=torch.bool), mode, global_denominator=0.0)
    assert zero_global.item() == 0.0


def _split_and_sum(loss: torch.Tensor, mask: torch.Tensor, mode: str, split: int) -> torch.Tensor:
    total = aggregation_terms(loss, mask, mode)[1]
    first = aggregate_loss(loss[:split], mask[:split], mode, global_denominator=total)
    second = aggregate_loss(loss[split:], mask[split:], mode, global_denominator=total)
    return first + second


def test_global_denominator_two_micro_batches_equal_full_batch_exactly():
    # 8 valid tokens in total (a power of two, so every division is exact); micro-batches hold 5 and 3 of them
    # (their local token-means differ from the global one: 12/5 = 2.4 and 24/3 = 8 vs 36/8 = 4.5).
    loss = torch.tensor([[1.0, 2.0, 3.0, 7.0], [4.0, 2.0, 0.0, 7.0], [8.0, 8.0, 8.0, 7.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]]).bool()
    full_leaf = loss.clone().requires_grad_()
    full = aggregate_loss(full_leaf, mask, "token-mean")
    full.backward()
    assert full.item() == 4.5  # (1 + 2 + 3 + 4 + 2 + 8 + 8 + 8) / 8 = 36 / 8
    split_leaf = loss.clone().requires_grad_()
    split = _split_and_sum(split_leaf, mask, "token-mean", 2)
    split.backward()
    assert torch.equal(split, full)
    assert torch.equal(split_leaf.grad, full_leaf.grad)
    # plain per-micro-batch means, averaged, would NOT match: (2.4 + 8) / 2 = 5.2
    naive = (aggregate_loss(loss[:2], mask[:2]) + aggregate_loss(loss[2:], mask[2:])) / 2
    assert naive.item() != full.item()


@given(seed=st.integers(0, 10_000), split=st.integers(1, 4), mode=st.sampled_from(AGGREGATION_MODES))
@SETTINGS
def test_global_denominator_any_split_matches_full_batch(seed, split, mode):
    gen = torch.Generator().manual_seed(seed)
    loss = torch.randn(5, 6, generator=gen, dtype=F64)
    mask = torch.rand(5, 6, generator=gen) > 0.4
    full_leaf = loss.clone().requires_grad_()
    full = aggregate_loss(full_leaf, mask, mode)
    full.backward()
    split_leaf = loss.clone().requires_grad_()
    total = _split_and_sum(split_leaf, mask, mode, split)
    total.backward()
    torch.testing.assert_close(total, full, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(split_leaf.grad, full_leaf.grad, atol=1e-12, rtol=1e-12)


def test_global_denominator_accepts_tensor_and_float():
    as_float = aggregate_loss(LOSS, MASK, "token-mean", global_denominator=10.0)
    as_tensor = aggregate_loss(LOSS, MASK, "token-mean", global_denominator=torch.tensor(10.0))
    assert as_float.item() == as_tensor.item() == pytest.approx(1.8)  # 18 / 10


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(LOSS, MASK, "seq-sum")  # the message lists the valid modes
    with pytest.raises(ValueError):
        aggregate_loss(LOSS, MASK[:, :2])
