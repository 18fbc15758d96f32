#!/usr/bin/env python
"""Time and peak memory of log-prob + entropy (forward + backward) over [N, V] logits, against Megatron-Core.

    .venv/bin/python benchmarks/bench_logprob_entropy.py            # CPU sizes, markdown tables
    .venv/bin/python benchmarks/bench_logprob_entropy.py --quick    # the smallest size only
    .venv/bin/python benchmarks/bench_logprob_entropy.py --sizes 8192x151936 --hidden 4096   # on a GPU

Each (variant, size) runs in a fresh subprocess: one warm-up step, then the median of --repeats steps.

1. ours: ``vocab_parallel_logprob_entropy`` (chunked, entropy gradient on); backward of log_prob + entropy sums.
2. megatron: Megatron-Core's ``vocab_parallel_cross_entropy`` on [N, 1, V] (log-prob = -loss, world-1 group) plus
   the usual separate entropy pass over ``log_softmax(logits.float())``; backward through both.
3. torch: ``log_softmax(logits.float())``, gather and ``-(p * log p).sum(-1)`` with autograd.
4. fused (only when ``megatron_hapo.parallel.fused_output`` imports): ``fused_logprob_entropy(hidden, weight)``.
   Its inputs are hidden states [N, H] and the output weight [V, H] (no logits exist) and its time includes the
   output-layer matmuls; its baseline is torch+matmul: ``logits = hidden @ weight.T``, then variant 3.

Memory: "extra peak" is everything a step adds beyond its inputs, gradients included: on CPU the peak resident
set size (reset through /proc/self/clear_refs after the warm-up step, gradients freed) minus the RSS then; on
CUDA ``max_memory_allocated() - memory_allocated()``. The children run with ``MALLOC_MMAP_THRESHOLD_=131072``:
glibc then returns freed tensors to the OS at once, where its default (a threshold that grows to 32 MiB) keeps
tens of MiB of freed chunks resident and the RSS would measure the allocator. "(extra - grad) / fp32 logits"
subtracts the inputs' gradients (the logits'; hidden's and weight's for 4) and divides by one float32 logits
tensor (N * V * 4 bytes). Targets: ours <= 0.25 there, and ours no slower than megatron.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_hapo.parallel import vocab_parallel_logprob_entropy
from megatron_hapo.parallel.chunked_softmax import auto_chunk_rows

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FUSED_MODULE = "megatron_hapo.parallel.fused_output"
Pair = tuple[torch.Tensor, torch.Tensor]


def torch_logprob_entropy(logits: torch.Tensor, targets: torch.Tensor) -> Pair:
    log_p = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy


def megatron_logprob_entropy(logits: torch.Tensor, targets: torch.Tensor) -> Pair:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy  # noqa: PLC0415

    # Entropy first: on float32 logits Megatron's CE works in place on them (its ``.float()`` is then a no-op).
    log_p = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    loss = vocab_parallel_cross_entropy(logits.unsqueeze(1), targets.unsqueeze(1), tp_group=dist.group.WORLD)
    return -loss.squeeze(1), entropy


def filled(shape: tuple[int, int], dtype: torch.dtype, device: str, scale: float, gen: torch.Generator) -> torch.Tensor:
    """A random leaf filled 256 rows at a time, so no whole-tensor float32 temporary inflates the peak."""
    out = torch.empty(shape, dtype=dtype, device=device)
    for block in out.split(256):
        block.copy_(torch.randn(block.shape, generator=gen) * scale)
    return out.requires_grad_()


def make_step(variant: str, n: int, v: int, args: argparse.Namespace, device: str) -> tuple[Callable[[], Pair], list]:
    """The inputs (leaves) and a closure computing ``(log_prob, entropy)`` from them."""
    gen, dtype = torch.Generator().manual_seed(0), DTYPES[args.dtype]
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    if variant in {"fused", "torch+matmul"}:
        hidden = filled((n, args.hidden), dtype, device, 1.0, gen)
        weight = filled((v, args.hidden), dtype, device, 3 / args.hidden**0.5, gen)
        if variant == "torch+matmul":
            return lambda: torch_logprob_entropy(hidden @ weight.T, targets), [hidden, weight]
        fused = importlib.import_module(FUSED_MODULE).fused_logprob_entropy
        kwargs = {"tp_group": None, "temperature": 1.0, "chunk_size": args.chunk or None, "with_entropy_grad": True}
        return lambda: fused(hidden, weight, targets, **kwargs), [hidden, weight]
    logits = filled((n, v), dtype, device, 3.0, gen)
    if variant == "ours":
        kwargs = {"tp_group": None, "chunk_size": args.chunk or None, "with_entropy_grad": True}
        return lambda: vocab_parallel_logprob_entropy(logits, targets, **kwargs), [logits]
    if variant == "megatron":
        dist.init_process_group(
            "nccl" if device == "cuda" else "gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1
        )
        return lambda: megatron_logprob_entropy(logits, targets), [logits]
    return lambda: torch_logprob_entropy(logits, targets), [logits]


def reset_peak(device: str, leaves: list[torch.Tensor]) -> int:
    """Frees the gradients and what the allocator caches; returns the bytes in use, the peak counter restarts."""
    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages resident otherwise
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (Linux >= 4.0)
        f.write("5")
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_step(forward: Callable[[], Pair], leaves: list[torch.Tensor], device: str) -> float:
    for leaf in leaves:
        leaf.grad = None
    start = time.perf_counter()
    log_prob, entropy = forward()
    (log_prob.sum() + entropy.sum()).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_child(variant: str, size: str, args: argparse.Namespace) -> dict[str, float | str]:
    """The warm-up step runs before the peak is reset: first-call costs (library pages, thread pools) are not the
    computation's memory; the RSS after it is the baseline."""
    warnings.filterwarnings("ignore")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, v = (int(x) for x in size.split("x"))
    forward, leaves = make_step(variant, n, v, args, device)
    timed_step(forward, leaves, device)
    base = reset_peak(device, leaves)
    times = [timed_step(forward, leaves, device) for _ in range(args.repeats)]
    grad_bytes = sum(leaf.numel() * leaf.element_size() for leaf in leaves)
    return {"seconds": statistics.median(times), "extra": peak(device) - base, "grad": grad_bytes, "device": device}


def run_variant(variant: str, size: str, args: argparse.Namespace) -> dict | str:
    """The child's result, or why it failed."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--sizes",
        size,
        "--dtype",
        args.dtype,
        "--chunk",
        str(args.chunk),
        "--hidden",
        str(args.hidden),
        "--repeats",
        str(args.repeats),
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no stderr"])[-1]
        return f"exit code {proc.returncode} ({'killed, likely OOM' if proc.returncode < 0 else tail[:200]})"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report_size(size: str, results: dict[str, dict | str], args: argparse.Namespace) -> None:
    n, v = (int(x) for x in size.split("x"))
    fp32 = n * v * 4
    chunk = args.chunk or auto_chunk_rows(n, v)
    print(
        f"\n### {n} x {v}, {args.dtype} logits ({n * v * DTYPES[args.dtype].itemsize / 2**20:.0f} MiB), "
        f"chunk {chunk} ({-(-n // chunk)} chunks), hidden {args.hidden} (fused rows)\n"
    )
    print("| variant | fwd+bwd time (s) | extra peak (MiB) | (extra − grad) / fp32 logits | time vs megatron |")
    print("|---|---|---|---|---|")
    ok = {k: r for k, r in results.items() if isinstance(r, dict)}
    for name, r in results.items():
        if not isinstance(r, dict):
            print(f"| {name} | OOM/failed | OOM/failed | OOM/failed | — |")
            continue
        if name == "fused":
            base = ok.get("torch+matmul")
            ratio = f"{r['seconds'] / base['seconds']:.2f} vs torch+matmul" if base else "—"
        elif name == "torch+matmul" or "megatron" not in ok:
            ratio = "— (baseline of fused)" if name == "torch+matmul" else "—"
        else:
            ratio = f"{r['seconds'] / ok['megatron']['seconds']:.2f}"
        print(
            f"| {name} | {r['seconds']:.3f} | {r['extra'] / 2**20:.0f} | {(r['extra'] - r['grad']) / fp32:.3f} "
            f"| {ratio} |"
        )
    for name, r in results.items():
        if not isinstance(r, dict):
            print(f"\n{name} failed: {r}")
    if "ours" not in ok:
        return
    ours, mem = ok["ours"], (ok["ours"]["extra"] - ok["ours"]["grad"]) / fp32
    vs = [f"{ours['extra'] / ok[b]['extra']:.3f} of {b}'s" for b in ("torch", "megatron") if b in ok]
    line = f"\nours: extra peak {', '.join(vs)}; memory target (extra − grad <= 0.25 fp32 logits): {mem:.3f} "
    line += "holds" if mem <= 0.25 else "FAILS"
    if "megatron" in ok:
        t = ours["seconds"] / ok["megatron"]["seconds"]
        line += f"; time target (ours <= megatron): {t:.2f}x, " + ("holds" if t <= 1 else "FAILS")
    print(line)


def fused_available() -> bool:
    try:
        return hasattr(importlib.import_module(FUSED_MODULE), "fused_logprob_entropy")
    except Exception as exc:  # any import failure means: skip the variant
        print(f"note: fused variant skipped ({FUSED_MODULE} does not import: {exc!r})")
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512x32000,2048x65536,2048x151936", help="N x V, comma-separated")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="logits (and hidden, weight) dtype")
    parser.add_argument("--chunk", type=int, default=0, help="rows per chunk for ours and fused (0: automatic)")
    parser.add_argument("--hidden", type=int, default=1024, help="H of the fused variant's inputs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="only the smallest size")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.sizes, args)))
        return
    sizes = sorted(args.sizes.split(","), key=lambda s: int(s.split("x")[0]) * int(s.split("x")[1]))
    sizes = sizes[:1] if args.quick else sizes
    variants = ["ours", "megatron", "torch"] + (["torch+matmul", "fused"] if fused_available() else [])
    device = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU"
    print(
        f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, median of {args.repeats} "
        "after one warm-up, fresh subprocess per (variant, size)"
    )
    for size in sizes:
        report_size(size, {variant: run_variant(variant, size, args) for variant in variants}, args)


if __name__ == "__main__":
    main()
