"""Rollout data parallelism: each engine replica generates only its share of a call's prompts.

With ``W`` ranks and ``E`` ranks per engine (the engine's tensor-parallel size) there are ``R = W / E`` engine
replicas; replica ``r`` is ranks ``[r E, (r + 1) E)`` (vLLM's external launcher groups consecutive ranks, and an
HF engine is one rank). A ``generate`` call's ``P`` prompts, each a whole group of ``n`` requests, are cut into
``R`` contiguous blocks (the first ``P mod R`` one prompt longer). Replica ``r`` generates its block with the
request seeds shifted by the block's first global request index, so that global request ``i`` samples with
``seed + i`` however many replicas there are. The first rank of each replica then contributes its responses to
one all-gather of objects: every rank returns the whole call's responses in the global order, the same on every
rank by construction (no demand that separate engines sample bit-identically).

Every caller of ``generate`` is divided this way: the step's rollout, DAPO's further generation rounds, the guide
policy's routed groups and evaluation. Each request is generated exactly once job-wide (``requests_served``
counts this replica's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from megatron_hapo.algos import EntropyStats
from megatron_hapo.parallel import runtime
from megatron_hapo.rollout.engine import Response, RolloutEngine, SamplingSettings


def replica_share(num_prompts: int, replicas: int, replica: int) -> tuple[int, int]:
    """``[start, stop)`` of replica ``replica``'s prompts among ``num_prompts`` split into ``replicas`` blocks."""
    base, extra = divmod(num_prompts, replicas)
    start = replica * base + min(replica, extra)
    return start, start + base + (replica < extra)


class DividedEngine:
    """A :class:`~megatron_hapo.rollout.engine.RolloutEngine` whose ``generate`` is divided over the replicas.

    Every rank of the job calls ``generate`` with the same arguments. The other methods go to this rank's engine.
    """

    def __init__(self, engine: RolloutEngine, ranks_per_engine: int = 1) -> None:
        world = runtime.world_size() if runtime.initialized() else 1
        if ranks_per_engine < 1 or world % ranks_per_engine:
            raise ValueError(f"{ranks_per_engine} ranks per engine must divide the {world} ranks of the job")
        self.engine = engine
        self.replicas = world // ranks_per_engine
        rank = runtime.rank() if runtime.initialized() else 0
        self.replica, self._first_of_replica = rank // ranks_per_engine, rank % ranks_per_engine == 0
        self.requests_served = 0
        """Requests this replica's engine generated so far (each replica counts its own)."""
        self._group = runtime.host_group() if world > 1 else None  # the responses travel in host memory

    def generate(
        self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingSettings, stats: EntropyStats | None
    ) -> list[Response]:
        """``n`` responses per prompt in the global order (``[p0 r0 .. p0 r(n-1), p1 r0, ...]``) on every rank."""
        if self.replicas == 1:
            self.requests_served += len(prompts) * n
            return self.engine.generate(prompts, n, sampling, stats)
        start, stop = replica_share(len(prompts), self.replicas, self.replica)
        local: list[Response] = []
        if stop > start:
            seed = None if sampling.seed is None else sampling.seed + start * n  # global request i: seed + i
            local = self.engine.generate(prompts[start:stop], n, dataclasses.replace(sampling, seed=seed), stats)
            self.requests_served += (stop - start) * n
        mine = [dataclasses.replace(r, prompt_index=r.prompt_index + start) for r in local]
        parts = runtime.all_gather_objects(mine if self._first_of_replica else [], group=self._group)
        return [response for part in parts for response in part]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.engine.load_weights(named_tensors)

    def prompt_log_probs(self, token_ids: Sequence[int]) -> torch.Tensor:
        return self.engine.prompt_log_probs(token_ids)

    def sleep(self, level: int | None = None) -> None:
        self.engine.sleep(level)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        self.engine.wake_up(tags)

    def close(self) -> None:
        self.engine.close()

    def __getattr__(self, name: str) -> Any:  # engine-specific attributes
        return getattr(self.engine, name)
