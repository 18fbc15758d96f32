"""Distributed EntropyStats equal the single-process statistics of the concatenated tokens."""

import pytest
import torch
import torch.distributed as dist
from gloo import run_on_ranks

from megatron_hapo.algos import normalized_entropy
from megatron_hapo.parallel import distributed_kth_smallest, distributed_normalized_entropy


def make_tokens(seed=0, rows=9, length=40):
    gen = torch.Generator().manual_seed(seed)
    entropy = torch.rand(rows, length, generator=gen) * 3
    entropy[0, :5] = 0.0  # zero entropy is floored at 1e-8 before the log
    mask = torch.rand(rows, length, generator=gen) > 0.3
    return entropy, mask


def test_kth_smallest_is_an_exact_element():
    values = torch.randn(1001, generator=torch.Generator().manual_seed(1)) * 5
    ordered = values.sort().values
    for k in (0, 1, 500, 999, 1000):
        assert distributed_kth_smallest(values, k, None) == float(ordered[k])


@pytest.mark.parametrize("sign", ["published", "paper"])
def test_single_rank_matches_algos(sign):
    entropy, mask = make_tokens()
    h_ref, ref = normalized_entropy(entropy, mask, sign=sign)
    h_hat, stats = distributed_normalized_entropy(entropy, mask, group=None, sign=sign)
    assert stats.as_floats() == pytest.approx(ref.as_floats(), rel=1e-6)
    torch.testing.assert_close(h_hat[mask], h_ref[mask])


def _rank_body(rank, world):
    entropy, mask = make_tokens()
    # uneven split of the 9 rows over the ranks; with 3 ranks, rank 0 holds no token at all
    bounds = {2: [0, 4, 9], 3: [0, 0, 4, 9], 4: [0, 2, 5, 5, 9]}[world]
    rows = slice(bounds[rank], bounds[rank + 1])
    for sign in ("published", "paper"):
        _, ref = normalized_entropy(entropy, mask, sign=sign)
        h_hat, stats = distributed_normalized_entropy(entropy[rows], mask[rows], group=dist.group.WORLD, sign=sign)
        got, want = stats.as_floats(), ref.as_floats()
        assert got["pivot"] == want["pivot"], (got, want)  # the exact same element
        assert got == pytest.approx(want, rel=1e-6)
        h_ref = normalized_entropy(entropy, mask, sign=sign)[0][rows]
        torch.testing.assert_close(h_hat[mask[rows]], h_ref[mask[rows]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_data_parallel_stats_match_concatenated_tokens(world, tmp_path):
    run_on_ranks(_rank_body, world, tmp_path)


def test_nan_entropy_is_rejected():
    entropy, mask = make_tokens()
    entropy[mask.nonzero()[0][0], mask.nonzero()[0][1]] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        distributed_normalized_entropy(entropy, mask, group=None)
