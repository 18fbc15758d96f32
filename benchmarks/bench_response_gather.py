#!/usr/bin/env python
"""Bytes each rank receives when the engine replicas' responses are shared (``rollout/divided.py``), and the time,
before (an all-gather of pickled ``Response`` lists over every rank) and after (each replica leader broadcasts
four flat tensors; the sizes go first), on gloo ranks of this machine.

    .venv/bin/python benchmarks/bench_response_gather.py            # 2 and 4 ranks, 1 and 2 ranks per engine
    .venv/bin/python benchmarks/bench_response_gather.py --quick    # fewer responses

The responses are drawn, not generated (the transport is what is measured, not an engine): the 70B config's
lengths (lognormal around 800 tokens, capped at 4,096), token ids, log-probs and HAPO's per-token temperatures, a
step of ``--prompts`` x 16 samples. Bytes: "before" is what ``torch.distributed.all_gather_object`` moves to each
rank (every rank's pickle padded to the largest, world x largest, plus the sizes); "after" is what
``runtime.broadcast_parts`` moves to each rank (every other leader's buffer at its exact size, plus 4 integers
per rank). Times: the median of ``--repeats`` calls of each (the new one with its packing and unpacking), in
the same processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_hapo.algos import EntropyStats
from megatron_hapo.parallel import runtime
from megatron_hapo.parallel.local_launch import run_local_ranks
from megatron_hapo.rollout.divided import PACKED_DTYPES, DividedEngine, pack_responses, replica_share, unpack_responses
from megatron_hapo.rollout.engine import Response, SamplingSettings

SAMPLES = 16


class DrawnEngine:
    """A rollout engine that draws its responses (seeded by the request's global index)."""

    def generate(
        self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingSettings, stats: EntropyStats | None = None
    ) -> list[Response]:
        out = []
        for p in range(len(prompts)):
            for i in range(n):
                gen = torch.Generator().manual_seed(sampling.seed + p * n + i)
                length = int(min(4096, torch.empty(1).log_normal_(6.68, 0.9, generator=gen).item()))
                tokens = torch.randint(0, 128_000, (length,), generator=gen).tolist()
                log_probs = -torch.rand(length, generator=gen) * 3
                temperatures = 0.7 + 0.6 * torch.rand(length, generator=gen)
                out.append(Response(p, tokens, log_probs, "stop", temperatures))
        return out


def _rank(rank: int, world: int, setting: tuple[int, int, int], out: str) -> None:
    """``setting``: ranks per engine, prompts, repeats."""
    ranks_per_engine, prompts, repeats = setting
    divided = DividedEngine(DrawnEngine(), ranks_per_engine=ranks_per_engine)
    sampling = SamplingSettings(max_tokens=4096, temperature=1.0, seed=0)
    all_prompts = [[1, 2, 3]] * prompts
    start, stop = replica_share(prompts, divided.replicas, divided.replica)
    local = DrawnEngine().generate(
        all_prompts[start:stop], SAMPLES, dataclasses.replace(sampling, seed=start * SAMPLES)
    )
    mine = [dataclasses.replace(r, prompt_index=r.prompt_index + start) for r in local]
    leader = rank % ranks_per_engine == 0
    part = mine if leader else []
    sizes = runtime.all_gather_objects(len(pickle.dumps(part)))  # what all_gather_object pads to
    packed = [t.numel() * t.element_size() for t in pack_responses(mine)] if leader else [0]
    buffers = runtime.all_gather_objects(sum(packed))
    before_bytes = world * max(sizes) + world * 8
    after_bytes = sum(b for r, b in enumerate(buffers) if r != rank) + world * 4 * 8
    leaders = [replica * ranks_per_engine for replica in range(divided.replicas)]
    times: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(repeats):
        runtime.barrier()
        t0 = time.perf_counter()
        old = [r for got in runtime.all_gather_objects(part, group=runtime.host_group()) for r in got]
        times["before"].append(time.perf_counter() - t0)
        runtime.barrier()
        t0 = time.perf_counter()  # what DividedEngine.generate does once its replica has generated
        packed_parts = pack_responses(mine) if leader else []
        parts = runtime.broadcast_parts(packed_parts, PACKED_DTYPES, leaders, group=runtime.host_group())
        new = [r for got in parts for r in unpack_responses(got)]
        times["after"].append(time.perf_counter() - t0)
    whole = divided.generate(all_prompts, SAMPLES, sampling, None)  # the real path gives the same
    assert [r.token_ids for r in new] == [r.token_ids for r in old] == [r.token_ids for r in whole]
    row = {
        "world": world,
        "ranks_per_engine": ranks_per_engine,
        "responses": len(new),
        "tokens": sum(len(r.token_ids) for r in new),
        "before_mb": before_bytes / 1e6,
        "after_mb": after_bytes / 1e6,
        "before_s": statistics.median(times["before"]),
        "after_s": statistics.median(times["after"]),
    }
    rows = runtime.all_gather_objects(row)
    if rank == 0:  # the busiest rank's figures
        worst = {key: max(r[key] for r in rows) for key in ("before_mb", "after_mb", "before_s", "after_s")}
        Path(out).write_text(json.dumps({**row, **worst}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    prompts, repeats = (8, 1) if args.quick else (args.prompts, args.repeats)
    print(
        "| ranks | ranks per engine | responses | tokens | MB received per rank, before | after | ratio | "
        "s, before | after |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for world, per_engine in ((2, 1), (4, 1), (4, 2)):
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "row.json")
            run_local_ranks(_rank, world, (per_engine, prompts, repeats), out, device="cpu")
            r = json.loads(Path(out).read_text())
        print(
            f"| {world} | {per_engine} | {r['responses']} | {r['tokens']:,} | {r['before_mb']:.1f} | "
            f"{r['after_mb']:.1f} | {r['before_mb'] / r['after_mb']:.2f}x | {r['before_s']:.2f} | {r['after_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
