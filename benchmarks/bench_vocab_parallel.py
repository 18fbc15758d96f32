#!/usr/bin/env python
"""Time and peak memory of log-prob + entropy over a logits shard, against the naive full-shard computation.

    .venv/bin/python benchmarks/bench_vocab_parallel.py [--tokens 4096 --vocab 65536 --chunk 1024]

Each variant runs in a fresh subprocess; peak memory is the process's maximum resident set size minus the size
just after the bf16 logits were allocated, so it measures the temporaries the computation adds (forward +
backward). Baseline: ``logits.float()`` then ``log_softmax``, gather and ``-(p * log p).sum()`` with autograd.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from megatron_hapo.parallel import vocab_parallel_logprob_entropy


def run_variant(variant: str, tokens: int, vocab: int, chunk: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(tokens, vocab, generator=gen) * 3).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "naive":
        log_p = torch.log_softmax(logits.float(), dim=-1)
        log_prob = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
    else:
        log_prob, entropy = vocab_parallel_logprob_entropy(
            logits, targets, tp_group=None, chunk_size=chunk, with_entropy_grad=True
        )
    (log_prob.sum() + entropy.sum()).backward()
    seconds = time.perf_counter() - start
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return {"seconds": seconds, "extra_peak_mib": peak_mib, "logits_mib": logits.numel() * 2 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--variant", choices=["naive", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.vocab, args.chunk)))
        return
    results = {}
    for variant in ("naive", "ours"):
        cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens),
               "--vocab", str(args.vocab), "--chunk", str(args.chunk)]  # fmt: skip
        results[variant] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    naive, ours = results["naive"], results["ours"]
    print(f"{args.tokens} tokens x {args.vocab} vocab, bf16 logits {naive['logits_mib']:.0f} MiB, chunk {args.chunk}\n")
    print("| variant | time fwd+bwd (s) | extra peak RSS (MiB) |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.2f} | {r['extra_peak_mib']:.0f} |")
    print(f"\nmemory ratio naive / ours: {naive['extra_peak_mib'] / max(ours['extra_peak_mib'], 1):.1f}; "
          f"time ratio naive / ours: {naive['seconds'] / ours['seconds']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
