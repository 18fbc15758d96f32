"""DP x micro-batch splits of a mini-batch give the exact single-process aggregated gradient."""

import pytest
import torch
import torch.distributed as dist
from gloo import run_on_ranks

from megatron_hapo.algos import AGGREGATION_MODES, aggregate_loss
from megatron_hapo.parallel import global_denominator, microbatch_loss

ROWS, LENGTH, VOCAB = 12, 7, 5


def make_batch():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, dtype=torch.float64, generator=gen)
    features = torch.randn(ROWS, LENGTH, VOCAB, dtype=torch.float64, generator=gen)
    lengths = torch.randint(0, LENGTH + 1, (ROWS,), generator=gen)  # includes empty responses
    mask = torch.arange(LENGTH).unsqueeze(0) < lengths.unsqueeze(1)
    return weight, features, mask


def per_token_loss(weight, features):
    return (features @ weight).sin()


def reference_grad(mode):
    weight, features, mask = make_batch()
    weight.requires_grad_()
    aggregate_loss(per_token_loss(weight, features), mask, mode).backward()
    return weight.grad


def split_grad(mode, rows_per_rank, num_microbatches, dp_group, dp_size):
    """Accumulate micro-batch losses as Megatron's schedule does, then average over DP as DDP does."""
    weight, features, mask = make_batch()
    weight.requires_grad_()
    rows = torch.arange(ROWS)[rows_per_rank]
    micro = rows.tensor_split(num_microbatches)
    denominator = global_denominator([mask[m] for m in micro], mode, dp_group=dp_group)
    for m in micro:
        loss = microbatch_loss(
            per_token_loss(weight, features[m]),
            mask[m],
            mode,
            denominator=denominator,
            num_microbatches=num_microbatches,
            dp_size=dp_size,
        )
        (loss / num_microbatches).backward()
    grad = weight.grad.clone()
    if dp_group is not None:
        dist.all_reduce(grad, group=dp_group)
    return grad / dp_size


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_microbatch_split_on_one_rank_is_exact(mode):
    torch.testing.assert_close(split_grad(mode, slice(None), 3, None, 1), reference_grad(mode))


def _rank_body(rank, world):
    bounds = [0, 3, 12] if world == 2 else [0, 1, 5, 12]  # uneven shares
    for mode in AGGREGATION_MODES:
        got = split_grad(mode, slice(bounds[rank], bounds[rank + 1]), 2, dist.group.WORLD, world)
        torch.testing.assert_close(got, reference_grad(mode))


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_split_is_exact(world, tmp_path):
    run_on_ranks(_rank_body, world, tmp_path)
