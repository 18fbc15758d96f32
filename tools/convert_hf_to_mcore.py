#!/usr/bin/env python
"""Convert a Hugging Face checkpoint (Llama 3, Qwen2/2.5, Qwen3) into a Megatron-Core torch_dist checkpoint.

    .venv/bin/python tools/convert_hf_to_mcore.py --hf-dir Qwen2.5-Math-1.5B --out ckpt/qwen-mcore [--tp 2 --pp 2]

The result loads at any TP / PP layout (Megatron reshards torch_dist checkpoints on load). ``--tp`` / ``--pp``
split the conversion itself over that many local CPU processes, each holding only its shard of the model.
Tensors are read one at a time from the safetensors files. The output appears only when complete (a failed
conversion leaves nothing behind). Runs on CPU (gloo), also on a GPU node; the HF config and tokenizer are kept
under ``OUT/hf/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_hapo.models.checkpoint import hf_to_mcore
from megatron_hapo.parallel import runtime
from megatron_hapo.parallel.local_launch import run_local_ranks
from megatron_hapo.trainer.preflight import check_model_dir

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _rank(rank: int, world: int, args: argparse.Namespace) -> None:
    runtime.quiet_logs()
    runtime.initialize_model_parallel(args.tp, args.pp)
    bar = tqdm(desc="tensors read", unit="t", disable=rank != 0)
    progress = (lambda _name: bar.update(1)) if rank == 0 else None
    spec = hf_to_mcore(args.hf_dir, args.out, dtype=DTYPES[args.dtype], progress=progress)
    if rank == 0:
        print(f"wrote {args.out}: {spec.family}, {spec.num_layers} layers, vocabulary {spec.vocab_size}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", type=Path, required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel processes of the conversion job")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel processes of the conversion job")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="stored dtype (auto: the checkpoint's)")
    args = parser.parse_args(argv)
    check_model_dir(str(args.hf_dir), "--hf-dir", vllm_on_cpu=False, tokenizer=False)  # config, weights: one line
    if args.out.exists():
        raise SystemExit(f"--out {args.out}: already exists; the conversion writes a new directory")
    run_local_ranks(_rank, args.tp * args.pp, args, device="cpu")
    return 0


if __name__ == "__main__":
    from megatron_hapo.processes import run_cli

    sys.exit(run_cli(main))  # a refused input: its line, status 2
