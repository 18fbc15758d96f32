#!/usr/bin/env python
"""Benchmarks of the algos hot spots, each as a ratio against a baseline measured in the same run.

    .venv/bin/python benchmarks/bench_algos.py            # prints a markdown table (docs/PERFORMANCE.md)
    .venv/bin/python benchmarks/bench_algos.py --quick    # smaller shapes, for a smoke run

1. ``hapo_advantages`` (vectorised scatter sums over [B] rewards) against a per-group loop over the padded
   [B, L] reward tensor, which is how the published code computes the token-level group average.
2. The pivot quantile of ``normalized_entropy`` (``kthvalue`` on the valid tokens) against ``torch.quantile``
   with nearest interpolation (which sorts, and refuses inputs over 16M elements).
3. ``adaptive_temperature`` on a decode step's full-vocabulary logits against the softmax the sampler computes
   anyway (the extra cost HAPO adds per decode step).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from megatron_hapo.algos import EntropyStats, adaptive_temperature, hapo_advantages, nearest_rank_quantile


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loop_token_group_average(rewards: torch.Tensor, mask: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """Baseline: per-group loop over the padded [B, L] token rewards (the published code's structure)."""
    scores = rewards.unsqueeze(-1) * mask
    out = torch.empty_like(scores)
    for group in sorted(set(groups)):
        rows = [i for i, g in enumerate(groups) if g == group]
        values = scores[rows].masked_select(mask[rows].bool())
        mean, std = values.mean(), values.std(unbiased=False)
        out[rows] = (scores[rows] - mean) / (std + 1e-6)
    return out


def bench_advantages(num_prompts: int, group: int, length: int, repeats: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(0)
    num = num_prompts * group
    rewards = torch.randint(0, 2, (num,), generator=gen).float() * 2 - 1
    lengths = torch.randint(1, length + 1, (num,), generator=gen)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).float()
    groups = torch.arange(num_prompts).repeat_interleave(group)
    ours = best_of(lambda: hapo_advantages(rewards, lengths, groups, padded_length=length), repeats)
    base = best_of(lambda: loop_token_group_average(rewards, mask, groups.tolist()), repeats)
    return ours, base


def bench_quantile(num_tokens: int, repeats: int) -> tuple[float, float]:
    values = torch.randn(num_tokens, generator=torch.Generator().manual_seed(1))
    ours = best_of(lambda: nearest_rank_quantile(values, 0.8), repeats)
    base = best_of(lambda: torch.quantile(values, 0.8, interpolation="nearest"), repeats)
    return ours, base


def bench_temperature(batch: int, vocab: int, repeats: int) -> tuple[float, float]:
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(2)) * 3
    stats = EntropyStats.from_floats(0.5, 1.2, 0.4, -0.6)
    ours = best_of(lambda: adaptive_temperature(logits, 1.0, stats, tau=0.05), repeats)
    base = best_of(lambda: torch.softmax(logits, dim=-1), repeats)
    return ours, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    scale = 8 if args.quick else 1
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    prompts, length = 512 // scale, 4096 // scale
    ours, base = bench_advantages(prompts, 16, length, args.repeats)
    rows.append((f"hapo_advantages, {prompts}x16 responses, L={length}", "per-group loop over [B, L]", ours, base))
    tokens = 8_000_000 // scale
    ours, base = bench_quantile(tokens, args.repeats)
    rows.append((f"pivot quantile (kthvalue), {tokens:,} tokens", "torch.quantile nearest", ours, base))
    batch, vocab = 256 // scale, 151_936
    ours, base = bench_temperature(batch, vocab, args.repeats)
    rows.append((f"adaptive_temperature, {batch}x{vocab} logits", "softmax of the same logits", ours, base))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| measurement | baseline | ours (ms) | baseline (ms) | baseline / ours |")
    print("|---|---|---|---|---|")
    for name, baseline, ours_s, base_s in rows:
        print(f"| {name} | {baseline} | {ours_s * 1e3:.1f} | {base_s * 1e3:.1f} | {base_s / ours_s:.2f} |")


if __name__ == "__main__":
    main()
