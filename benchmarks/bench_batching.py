#!/usr/bin/env python
"""Padding against token-budget micro-batches and packing: tokens computed per real token, and the trainer's
forward + backward time per real token on a small Megatron GPT (CPU).

    .venv/bin/python benchmarks/bench_batching.py              # counts at full scale + CPU timings
    .venv/bin/python benchmarks/bench_batching.py --quick      # fewer sequences, one repeat

Lengths (fixed seed): prompts uniform in [80, 400] tokens, responses lognormal with sigma 0.9 around a median,
capped (the issue's three distributions: median 2,000 / cap 10,240, the 7B recipe; 800 / 4,096, the 70B config;
3,000 / 16,384). Three ways to cut them into micro-batches, all through ``trainer.microbatch``:

1. today: one sequence per micro-batch (``micro_batch_size=1`` as the shipped configs used), every row padded to
   the step's longest sequence (``uniform_shape``: what the trainer did before token budgets);
2. budget: ``max_tokens`` per micro-batch, sequences sorted longest first, first-fit, each micro-batch padded to
   its own longest (rounded up to 16);
3. packed: the same budget counting real tokens, sequences packed into one THD row.

"processed / real" counts every token the layers compute on (padding included); "attention / real" the
attention score entries (``S^2`` per row; a packed row attends within each sequence only, as Transformer
Engine's THD kernels and our local attention do) over the real ones (``sum s_i^2``). Timings run the real path
(``StepBatch`` -> ``microbatches`` -> ``run_schedule`` with ``PolicyLossStep``) on lengths divided by
``--scale``; the median of ``--repeats`` steps after one warm-up, each variant in a fresh process (for its peak
resident memory), all in one run. A second table compares the packed layout with and without the fused output
layer (``model.fused_output``) at a vocabulary of 64 x the hidden size, the shipped models' ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

DISTRIBUTIONS = {"7B recipe": (2000, 10240), "70B config": (800, 4096), "long": (3000, 16384)}
LAYOUTS = ("today", "budget", "packed")


def sample_lengths(count: int, median: int, cap: int, *, scale: int = 1, seed: int = 0) -> tuple[list, list]:
    """``(prompt lengths, response lengths)`` of ``count`` sequences, divided by ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(80, 401, (count,), generator=gen)
    responses = (torch.randn(count, generator=gen, dtype=torch.float64) * 0.9 + torch.tensor(median).log()).exp()
    responses = responses.round().clamp(1, cap).long()
    return (prompts // scale).clamp_min(1).tolist(), (responses // scale).clamp_min(1).tolist()


def layout_of(name: str, budget: int) -> object:
    from megatron_hapo.trainer.microbatch import BatchLayout  # noqa: PLC0415

    if name == "today":
        return BatchLayout(micro_batch_size=1, uniform_shape=True)
    return BatchLayout(max_tokens=budget, pack=name == "packed")


def counts(lengths: list[int], name: str, budget: int) -> dict[str, float]:
    """Tokens and attention entries computed, over the real ones, for sequences of total ``lengths``."""
    from megatron_hapo.trainer.microbatch import SEQUENCE_MULTIPLE, assign_microbatches, round_up  # noqa: PLC0415

    real, real_attention = sum(lengths), sum(s * s for s in lengths)
    tensor = torch.tensor(lengths)
    if name == "today":
        width = round_up(max(lengths), SEQUENCE_MULTIPLE)
        return {
            "tokens": len(lengths) * width / real,
            "attention": len(lengths) * width**2 / real_attention,
            "microbatches": len(lengths),
        }
    layout = layout_of(name, budget)
    groups = assign_microbatches(tensor, layout)
    tokens = attention = 0
    for group in groups:
        sizes = tensor[group].tolist()
        cost = layout.cost(sizes)
        tokens += cost
        if layout.pack:
            attention += sum(s * s for s in sizes) + (cost - sum(sizes)) ** 2
        else:
            attention += cost * round_up(max(sizes), SEQUENCE_MULTIPLE)
    return {"tokens": tokens / real, "attention": attention / real_attention, "microbatches": len(groups)}


def count_table(count: int, budget: int) -> str:
    lines = [
        f"Full-scale counts: {count} sequences, budget {budget} tokens per micro-batch (seed 0).\n",
        "| lengths (median / cap) | layout | micro-batches | processed / real | attention / real |",
        "|---|---|---|---|---|",
    ]
    for label, (median, cap) in DISTRIBUTIONS.items():
        prompts, responses = sample_lengths(count, median, cap)
        lengths = [p + r for p, r in zip(prompts, responses, strict=True)]
        for name in LAYOUTS:
            c = counts(lengths, name, max(budget, *lengths))
            lines.append(
                f"| {label} ({median} / {cap}) | {name} | {c['microbatches']} | {c['tokens']:.2f} | "
                f"{c['attention']:.2f} |"
            )
    return "\n".join(lines)


def _model_and_batch(args: argparse.Namespace) -> tuple:
    from megatron_hapo.models import TinyGPTShape, build_tiny_gpt  # noqa: PLC0415
    from megatron_hapo.parallel import runtime  # noqa: PLC0415
    from megatron_hapo.rollout.engine import Response  # noqa: PLC0415
    from megatron_hapo.trainer.batch import StepBatch  # noqa: PLC0415

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    runtime.join_process_group(rank=0, world_size=1)
    runtime.quiet_logs()
    runtime.initialize_model_parallel(1, 1)
    median, cap = DISTRIBUTIONS["7B recipe"]
    prompts, responses = sample_lengths(args.sequences, median, cap, scale=args.scale, seed=1)
    shape = TinyGPTShape(
        vocab_size=args.vocab,
        seq_length=4096,
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=8,
        num_query_groups=8,
        ffn_hidden_size=4 * args.hidden,
    )
    chunks = build_tiny_gpt(shape, seed=0)
    gen = torch.Generator().manual_seed(2)
    prompt_ids = [torch.randint(3, args.vocab, (p,), generator=gen).tolist() for p in prompts]
    outs = [
        Response(i, torch.randint(3, args.vocab, (r,), generator=gen).tolist(), -torch.rand(r, generator=gen), "stop")
        for i, r in enumerate(responses)
    ]
    batch = StepBatch.from_responses(prompt_ids, outs, max_response_length=max(responses))
    batch.old_log_prob = batch.rollout_log_prob.clone()
    batch.advantages = torch.randn(batch.response_mask.shape, generator=gen) * batch.response_mask
    return chunks, batch


def measure(args: argparse.Namespace) -> dict:
    """One variant (``args.child``: a layout name, ``+fused`` for the fused output layer) in this process."""
    from megatron_hapo.config import load_config  # noqa: PLC0415
    from megatron_hapo.parallel.policy_loss import ParallelGroups, PolicyLossStep, plan_minibatch  # noqa: PLC0415
    from megatron_hapo.trainer.microbatch import microbatches, run_schedule  # noqa: PLC0415

    name, fused = args.child.removesuffix("+fused"), args.child.endswith("+fused")
    chunks, batch = _model_and_batch(args)
    groups = ParallelGroups.from_megatron()
    algo = load_config("configs/algo/hapo.yaml", ["algo.entropy.scope=microbatch"], warn=False).algo
    mbs, _ = microbatches(batch, torch.arange(batch.num_sequences), layout_of(name, args.budget), train=True)
    plan = plan_minibatch(mbs, algo, groups)
    step = PolicyLossStep(algo, groups, plan, args.vocab, fused_output=fused)
    times = []
    for _ in range(args.repeats + 1):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        start = time.perf_counter()
        run_schedule(step, mbs, chunks, forward_only=False)
        times.append(time.perf_counter() - start)
    return {
        "microbatches": len(mbs),
        "processed": sum(mb.tokens.numel() for mb in mbs),
        "real": int(batch.lengths.sum()),
        "longest": int(batch.lengths.max()),
        "seconds": statistics.median(times[1:]),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def time_table(args: argparse.Namespace, variants: tuple[str, ...], baseline: str) -> str:
    """Each variant in a fresh process (peak memory is per process), all on this machine in one run."""
    results = {}
    for variant in variants:
        command = [sys.executable, __file__, "--child", variant, *sys.argv[1:]]
        out = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "MASTER_PORT": str(29531 + len(results))},
        ).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    first = next(iter(results.values()))
    base = results[baseline]
    lines = [
        f"{args.sequences} sequences (7B-recipe lengths / {args.scale}: {first['real']} real tokens, longest "
        f"{first['longest']}), GPT {args.layers} layers x {args.hidden} hidden, vocabulary {args.vocab}, fp32, "
        f"budget {args.budget}, {torch.get_num_threads()} threads; forward + backward of the policy loss "
        f"(median of {args.repeats}); peak resident memory of the whole process.\n",
        f"| variant | micro-batches | processed / real | seconds | ms per 1k real tokens | time vs {baseline} | "
        "peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, r in results.items():
        lines.append(
            f"| {variant} | {r['microbatches']} | {r['processed'] / r['real']:.2f} | {r['seconds']:.2f} | "
            f"{1e6 * r['seconds'] / r['real']:.1f} | {r['seconds'] / base['seconds']:.2f}x | "
            f"{r['peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 sequences, one repeat")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--scale", type=int, default=16, help="divide the lengths by this for the CPU timing")
    parser.add_argument("--budget", type=int, default=1024, help="tokens per micro-batch in the CPU timing")
    parser.add_argument("--full-budget", type=int, default=16384, help="tokens per micro-batch in the counts")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--fused-vocab",
        type=int,
        default=16384,
        help="vocabulary of the fused-output comparison (64 x hidden, as the shipped models' V / H)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.sequences, args.repeats = 16, 1
    if args.child:
        print(json.dumps(measure(args)))
        return
    print(count_table(1024, args.full_budget))
    print("\n### CPU timing: padding, token budget, packing\n")
    print(time_table(args, LAYOUTS, "today"))
    sys.argv += ["--vocab", str(args.fused_vocab)]
    args.vocab = args.fused_vocab
    print("\n### CPU timing: the fused output layer (packed micro-batches)\n")
    print(time_table(args, ("packed", "packed+fused"), "packed"))


if __name__ == "__main__":
    main()
