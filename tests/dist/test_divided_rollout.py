"""Rollout data parallelism (rollout/divided.py) on two gloo ranks, each with its own HF engine (two replicas).

Each replica generates only its block of prompt groups, with the request seeds of their global positions: the
gathered responses equal one engine generating the whole call (the HF engine's tokens depend on prompt, seed and
weights only), every rank holds the same list, and each request was generated exactly once job-wide.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from gloo import run_on_ranks
from test_hf_engine import _engine, tiny_llama  # noqa: F401  (the shared fixture)

from megatron_hapo.rollout.divided import replica_share

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16, 17]]  # 5 prompts over 2 replicas: 3 + 2
N = 2


def test_replica_share_covers_every_prompt_once() -> None:
    for prompts in range(0, 12):
        for replicas in (1, 2, 3, 8):
            blocks = [replica_share(prompts, replicas, r) for r in range(replicas)]
            assert [i for start, stop in blocks for i in range(start, stop)] == list(range(prompts))
            assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1


def _ranks(rank: int, world: int, hf_dir: Path, out: Path) -> None:
    from megatron_hapo.parallel import runtime
    from megatron_hapo.rollout.divided import DividedEngine
    from megatron_hapo.rollout.engine import SamplingSettings

    engine = _engine(hf_dir)
    divided = DividedEngine(engine, ranks_per_engine=1)
    sampling = SamplingSettings(max_tokens=6, temperature=1.0, seed=11)
    got = divided.generate(PROMPTS, N, sampling, None)
    whole = engine.generate(PROMPTS, N, sampling, None)  # this rank's engine alone, the whole call
    mine = [(r.prompt_index, r.token_ids, r.log_probs.tolist()) for r in got]
    report = {
        "same_on_ranks": all(part == mine for part in runtime.all_gather_objects(mine)),
        "served": runtime.all_gather_objects(divided.requests_served),
        "indices": [r.prompt_index for r in got],
        "equal_tokens": [a.token_ids == b.token_ids for a, b in zip(got, whole, strict=True)],
        "log_prob_diff": max(float((a.log_probs - b.log_probs).abs().max()) for a, b in zip(got, whole, strict=True)),
        "distinct": len({tuple(r.token_ids) for r in got}),
    }
    if rank == 0:
        out.write_text(json.dumps(report))


def test_each_request_is_generated_once_and_the_responses_do_not_depend_on_the_replicas(
    tiny_llama: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    report = tmp_path / "report.json"
    run_on_ranks(partial(_ranks, hf_dir=tiny_llama, out=report), 2, tmp_path / "ranks")
    result = json.loads(report.read_text())
    assert result["served"] == [6, 4]  # 3 and 2 prompts of 2 requests: 10 requests, each generated once
    assert result["same_on_ranks"], result
    assert result["indices"] == [i for i in range(len(PROMPTS)) for _ in range(N)]
    assert all(result["equal_tokens"]) and result["log_prob_diff"] <= 1e-5, result  # batch-shape float noise
    assert result["distinct"] > 1  # seeded per request: not one response repeated


def test_unseeded_calls_are_still_divided(tiny_llama: Path, tmp_path: Path) -> None:  # noqa: F811
    report = tmp_path / "report.json"
    run_on_ranks(partial(_unseeded_ranks, hf_dir=tiny_llama, out=report), 2, tmp_path / "ranks")
    result = json.loads(report.read_text())
    assert result["served"] == [6, 4] and result["count"] == len(PROMPTS) * N and result["same_on_ranks"], result


def _unseeded_ranks(rank: int, world: int, hf_dir: Path, out: Path) -> None:
    from megatron_hapo.parallel import runtime
    from megatron_hapo.rollout.divided import DividedEngine
    from megatron_hapo.rollout.engine import SamplingSettings

    divided = DividedEngine(_engine(hf_dir, seed=rank), ranks_per_engine=1)  # engines that would differ
    got = divided.generate(PROMPTS, N, SamplingSettings(max_tokens=4, temperature=1.0), None)
    mine = [r.token_ids for r in got]
    report = {
        "served": runtime.all_gather_objects(divided.requests_served),
        "count": len(got),
        "same_on_ranks": all(part == mine for part in runtime.all_gather_objects(mine)),
    }
    if rank == 0:
        out.write_text(json.dumps(report))
