"""Rollout seeds: request ``i`` of a generation round samples with ``base + i``; no two rounds of a run (nor of two
runs with other ``train.seed``) may share a request seed, else their sampling noise repeats. The old base,
``train.seed * 1_000_003 + step``, made request ``i + 1`` of step ``k`` and request ``i`` of step ``k + 1`` draw
the same numbers (the rollout viewer showed the same tokens one request apart in consecutive steps)."""

from __future__ import annotations

import itertools

from megatron_hapo.trainer.generation import rollout_seed
from megatron_hapo.trainer.guide import GUIDE_SEED_OFFSET

REQUESTS = 4096  # a large step's requests (256 prompts x 16 samples)


def test_no_two_rounds_share_a_request_seed() -> None:
    bases = sorted(
        rollout_seed(train_seed, step, round_index)
        for train_seed in (0, 1, 2, 42, 1234)
        for step in range(400)
        for round_index in range(4)
    )
    assert len(set(bases)) == len(bases)
    gaps = [b - a for a, b in itertools.pairwise(bases)]
    assert min(gaps) > REQUESTS + GUIDE_SEED_OFFSET  # the policy's and the guide's requests of each round apart
    assert bases[-1] + REQUESTS + GUIDE_SEED_OFFSET < 2**63  # a valid torch / vLLM generator seed


def test_the_seed_is_a_function_of_the_run_step_and_round() -> None:
    assert rollout_seed(0, 5, 1) == rollout_seed(0, 5, 1)
    assert len({rollout_seed(0, 5, 1), rollout_seed(0, 5, 0), rollout_seed(0, 6, 1), rollout_seed(1, 5, 1)}) == 4
