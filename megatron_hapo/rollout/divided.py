"""Rollout data parallelism: each engine replica generates only its share of a call's prompts.

With ``W`` ranks and ``E`` ranks per engine (the engine's tensor-parallel size) there are ``R = W / E`` engine
replicas; replica ``r`` is ranks ``[r E, (r + 1) E)`` (vLLM's external launcher groups consecutive ranks, and an
HF engine is one rank). A ``generate`` call's ``P`` prompts, each a whole group of ``n`` requests, are cut into
``R`` contiguous blocks (the first ``P mod R`` one prompt longer). Replica ``r`` generates its block with the
request seeds shifted by the block's first global request index, so that global request ``i`` samples with
``seed + i`` however many replicas there are. The first rank of each replica then broadcasts its responses as
four flat tensors (per response: prompt index, length, finish reason; the token ids, log-probs and sampling
temperatures of all its responses back to back) to every rank: every rank returns the whole call's responses in
the global order, the same on every rank by construction (no demand that separate engines sample
bit-identically). Each rank receives every response's bytes once and nothing from the other ranks (an
all-gather of pickled objects sent every rank's part, mostly empty ones, padded to the largest:
``benchmarks/bench_response_gather.py``).

Every caller of ``generate`` is divided this way: the step's rollout, DAPO's further generation rounds, the guide
policy's routed groups and evaluation. Each request is generated exactly once job-wide (``requests_served``
counts this replica's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch

from megatron_hapo.algos import EntropyStats
from megatron_hapo.parallel import runtime
from megatron_hapo.rollout.engine import FinishReason, Response, RolloutEngine, SamplingSettings

#: The flat tensors a replica's responses travel as (:func:`pack_responses`), widest first (byte alignment).
PACKED_DTYPES = [torch.int64, torch.int32, torch.float32, torch.float32]
_FINISH_CODES: dict[str, int] = {"stop": 0, "length": 1}


def pack_responses(responses: Sequence[Response]) -> list[torch.Tensor]:
    """``responses`` as :data:`PACKED_DTYPES` tensors: ``[4 n]`` (prompt index, length, finish reason, has
    temperatures) per response, ``[T]`` token ids, ``[T]`` log-probs, ``[T']`` temperatures of those that have
    them (``T`` all tokens)."""
    meta = [
        [r.prompt_index, len(r.token_ids), _FINISH_CODES[r.finish_reason], r.temperatures is not None]
        for r in responses
    ]
    return [
        torch.tensor(meta, dtype=torch.int64).reshape(-1),
        torch.tensor([t for r in responses for t in r.token_ids], dtype=torch.int32),
        torch.cat([r.log_probs.float().reshape(-1) for r in responses]) if responses else torch.zeros(0),
        torch.cat([torch.zeros(0), *(r.temperatures.float() for r in responses if r.temperatures is not None)]),
    ]


def unpack_responses(parts: Sequence[torch.Tensor]) -> list[Response]:
    """The responses of :func:`pack_responses`' tensors."""
    meta, tokens, log_probs, temperatures = parts
    finish = {code: name for name, code in _FINISH_CODES.items()}
    out, start, temp_start = [], 0, 0
    for prompt_index, length, code, has_temperatures in meta.view(-1, 4).tolist():
        stop = start + length
        temps = None
        if has_temperatures:
            temps, temp_start = temperatures[temp_start : temp_start + length].clone(), temp_start + length
        reason = cast("FinishReason", finish[code])
        out.append(Response(prompt_index, tokens[start:stop].tolist(), log_probs[start:stop].clone(), reason, temps))
        start = stop
    return out


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
        self.replica, self.ranks_per_engine = rank // ranks_per_engine, ranks_per_engine
        self._first_of_replica = rank % ranks_per_engine == 0
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
        leaders = [replica * self.ranks_per_engine for replica in range(self.replicas)]
        packed = pack_responses(mine) if self._first_of_replica else []  # the replica's other ranks hold the same
        parts = runtime.broadcast_parts(packed, PACKED_DTYPES, leaders, group=self._group)
        return [response for part in parts for response in unpack_responses(part)]

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
