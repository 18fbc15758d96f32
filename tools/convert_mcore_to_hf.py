#!/usr/bin/env python
"""Convert a checkpoint written by convert_hf_to_mcore.py (or the trainer) back to Hugging Face safetensors.

    .venv/bin/python tools/convert_mcore_to_hf.py --ckpt ckpt/qwen-mcore --out qwen-trained-hf [--max-shard-gb 5]

Writes sharded ``model-0000k-of-0000n.safetensors`` files with their index, plus the config and tokenizer files
kept at conversion. One CPU process streams the layers straight from the torch_dist files (whatever layout wrote
them), ``--read-gb`` at a time, and writes each shard as soon as it is full: peak memory is about one shard plus
one read group, never the model. Tensors keep their stored dtype unless ``--dtype`` says otherwise. The output
appears only when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from megatron_hapo.models.checkpoint import mcore_to_hf
from megatron_hapo.parallel import runtime
from megatron_hapo.parallel.local_launch import run_local_ranks
from megatron_hapo.trainer.preflight import check_checkpoint_data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_hf_to_mcore import DTYPES


def _rank(rank: int, world: int, args: argparse.Namespace) -> None:
    runtime.quiet_logs()
    runtime.initialize_model_parallel(1, 1)
    bar = tqdm(desc="tensors written", unit="t")
    mcore_to_hf(
        args.ckpt,
        args.out,
        max_shard_bytes=int(args.max_shard_gb * 2**30),
        dtype=DTYPES[args.dtype],
        read_bytes=int(args.read_gb * 2**30),
        progress=bar.update,
    )
    bar.close()
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="Megatron torch_dist checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="output HF directory (must not exist)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="size of each safetensors file")
    parser.add_argument("--read-gb", type=float, default=1.0, help="bytes read from the checkpoint at a time")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="written dtype (auto: the stored one)")
    args = parser.parse_args(argv)
    steps = sorted(args.ckpt.glob("step_*")) or sorted(args.ckpt.glob("checkpoints/step_*"))
    if not (args.ckpt / ".metadata").is_file() and steps:  # a run's checkpoints/ folder or the run itself
        raise SystemExit(f"--ckpt {args.ckpt}: a directory of checkpoints; pass one of them, e.g. {steps[-1]}")
    check_checkpoint_data(args.ckpt, f"--ckpt {args.ckpt}")  # before any of its pickles is read
    if args.out.exists():
        raise SystemExit(f"--out {args.out}: already exists; the export writes a new directory")
    run_local_ranks(_rank, 1, args, device="cpu")
    return 0


if __name__ == "__main__":
    from megatron_hapo.processes import run_cli

    sys.exit(run_cli(main))  # a refused input: its line, status 2
