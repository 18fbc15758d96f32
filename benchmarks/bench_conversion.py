#!/usr/bin/env python
"""Checkpoint conversion throughput against a plain read + write of the same safetensors bytes.

    .venv/bin/python benchmarks/bench_conversion.py [--hidden 1024 --layers 8 --vocab 32000]

A random Llama-shaped bf16 checkpoint is written with transformers; then, each timed once after the page cache
is warm: the baseline reads every tensor with safetensors, writes them all to a new file and fsyncs it; ``hf_to_mcore``
(one CPU process) and ``mcore_to_hf`` convert it through the mapping table, twice in the same process (the first
conversion also pays Megatron's one-off start-up of its checkpoint writer). Throughput is checkpoint bytes per
second; the ratio is conversion / baseline (target >= 0.5).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_hapo.models import HFCheckpoint
from megatron_hapo.models.checkpoint import hf_to_mcore, mcore_to_hf
from megatron_hapo.parallel import runtime
from megatron_hapo.parallel.local_launch import run_local_ranks


def _write_model(path: Path, args: argparse.Namespace) -> int:
    import transformers  # noqa: PLC0415

    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=args.hidden * 3,
        dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _plain_copy(src: Path, dst: Path) -> float:
    """Read every tensor, write them to one file and fsync it (both conversions fsync what they write)."""
    start = time.perf_counter()
    checkpoint = HFCheckpoint(src)
    save_file({name: checkpoint[name] for name in checkpoint.names()}, str(dst))
    with dst.open("rb+") as handle:
        os.fsync(handle.fileno())
    return time.perf_counter() - start


def _convert(rank: int, world: int, src: Path, work: Path, out: Path) -> None:
    """Both directions twice in one process: the first pays Megatron's one-off writer start-up, the second not."""
    runtime.quiet_logs()
    runtime.initialize_model_parallel(1, 1)
    times = []
    for run in ("first", "second"):
        start = time.perf_counter()
        hf_to_mcore(src, work / f"mcore-{run}")
        middle = time.perf_counter()
        mcore_to_hf(work / f"mcore-{run}", work / f"back-{run}")
        times += [middle - start, time.perf_counter() - middle]
    out.write_text(" ".join(map(str, times)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        size = _write_model(work / "hf", args)
        _plain_copy(work / "hf", work / "warm.safetensors")  # warm the page cache
        plain = _plain_copy(work / "hf", work / "copy.safetensors")
        run_local_ranks(_convert, 1, work / "hf", work, work / "times.txt")
        times = [float(t) for t in (work / "times.txt").read_text().split()]
    mib = size / 2**20
    print(f"checkpoint: {mib:.0f} MiB bf16 ({args.layers} layers, hidden {args.hidden}, vocab {args.vocab})\n")
    print("| step | seconds | MiB/s | ratio vs plain read+write |")
    print("|---|---|---|---|")
    steps = (
        "hf_to_mcore, first in the process",
        "mcore_to_hf, first in the process",
        "hf_to_mcore, second in the process",
        "mcore_to_hf, second in the process",
    )
    for name, seconds in (("plain read + write", plain), *zip(steps, times, strict=True)):
        print(f"| {name} | {seconds:.2f} | {mib / seconds:.0f} | {plain / seconds:.2f} |")


if __name__ == "__main__":
    main()
