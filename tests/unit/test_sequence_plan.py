"""The step's sequence plan: every forward-only sequence on exactly one data-parallel rank, and the groups the
filter dropped only when something reads the whole rollout's entropy statistics."""

from __future__ import annotations

import pytest
import torch

from megatron_hapo.algos import reads_rollout_entropy
from megatron_hapo.config import load_config
from megatron_hapo.config.presets import preset_path
from megatron_hapo.trainer.plan import SequencePlan

N = 4  # samples per prompt
KEEP_GROUPS = [True, False, True, True, False, False]  # 6 prompts, 3 kept


def _plans(dp: int, guide_rows: int = 0) -> list[SequencePlan]:
    keep = torch.tensor(KEEP_GROUPS).repeat_interleave(N)
    keep = torch.cat([keep, torch.ones(guide_rows, dtype=torch.bool)])
    lengths = torch.arange(len(keep)) % 7 + 3  # uneven: the split balances tokens
    return [
        SequencePlan.build(keep, N, 2, num_on_policy=len(KEEP_GROUPS) * N, dp=(rank, dp), lengths=lengths)
        for rank in range(dp)
    ]


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_forward_rows_cover_each_sequence_once(dp: int) -> None:
    plans = _plans(dp, guide_rows=N)  # the guide's rows are trained, never forward-only
    kept = torch.tensor(KEEP_GROUPS).repeat_interleave(N).nonzero().flatten().tolist()
    for untrained, expected in ((True, list(range(len(KEEP_GROUPS) * N))), (False, kept)):
        shares = [plan.forward_rows(untrained=untrained).tolist() for plan in plans]
        assert sorted(row for share in shares for row in share) == expected, (untrained, shares)
        assert all(share == sorted(share) for share in shares)
    # without the dropped groups each rank keeps exactly its share of the mini-batches it trains
    for plan in plans:
        trained = torch.cat([plan.local(rows) for rows in plan.minibatches])
        assert plan.forward_rows(untrained=False).tolist() == sorted(r for r in trained.tolist() if r < 24)


@pytest.mark.parametrize(
    ("preset", "overrides", "reads"),
    [
        ("hapo", [], True),  # the next rollout's adaptive temperature
        ("hapo", ["algo.sampling.kind=fixed"], False),  # the loss's statistics are per micro-batch
        ("hapo", ["algo.sampling.kind=fixed", "algo.entropy.scope=step"], True),  # the loss reads the step's
        ("hapo", ["algo.sampling.kind=fixed", "algo.entropy.scope=minibatch"], False),
        ("dapo", [], False),
        ("grpo", [], False),
        ("gtpo", [], False),  # its entropy terms read the kept groups' own entropies
        ("grpo_s", [], False),
    ],
)
def test_who_reads_the_whole_rollouts_entropy(preset: str, overrides: list[str], reads: bool) -> None:
    config = load_config(preset_path(preset), overrides, warn=False)
    assert reads_rollout_entropy(config.algo) is reads


def test_generation_rounds_ask_for_the_groups_the_keep_rate_says_they_need() -> None:
    """DAPO's rounds over-sampled: needed / keep rate prompts, never fewer than needed nor more than the cap."""
    from megatron_hapo.trainer.generation import round_prompts

    assert round_prompts(32, None, 3.0) == 32  # no estimate before the first filtered step
    assert round_prompts(32, 0.5, 3.0) == 64
    assert round_prompts(32, 0.1, 3.0) == 96  # capped at 3x
    assert round_prompts(32, 1.0, 3.0) == 32 and round_prompts(32, 0.5, 1.0) == 32  # oversample 1: as before
    assert round_prompts(5, 0.0, 2.0) == 10 and round_prompts(0, 0.5, 3.0) == 0
