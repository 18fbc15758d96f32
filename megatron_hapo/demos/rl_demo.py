"""The whole RL stack on a CPU: a tiny Llama learns modular addition with real Megatron and real vLLM (the
quickstart's second stage).

    python -m megatron_hapo.demos.rl_demo [--presets hapo dapo] [--steps 60] [--warmup-steps 15] [--seed 0]

The task (:func:`megatron_hapo.demos.tasks.modular_sum_task`): the prompt is ``a + b =`` over ten digit tokens,
right when the first response token is the digit of ``(a + b) mod 10``. A random model is almost never right, so
a short supervised warm-up on reference answers comes first (:mod:`megatron_hapo.trainer.warmup`).

Two gloo ranks hold a Megatron GPT at TP2 (Megatron DDP + Adam) and a colocated vLLM engine at TP2, shared by the
presets. Each preset starts from the same random model and the same warm-up (same seed), then runs the trainer's
loop (:func:`megatron_hapo.trainer.loop.train`): generate groups, score them in verifier worker processes,
advantages, update, a verified weight sync, and avg@8 / pass@8 over every distinct prompt every 10 steps. Prints a
progress line per step and a table; draws the curves per step and per generated sample into
``RUN_DIR/curves.png`` (metrics in ``RUN_DIR/<preset>/metrics.jsonl``, library logs in ``RUN_DIR/log.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from megatron_hapo.demos.runner import DemoJob, prepare_run_dir, run_presets, split_overrides, summary_rows
from megatron_hapo.demos.tasks import modular_sum_task, write_tiny_llama

VOCAB, HIDDEN, EOS = 512, 128, 2


def job_overrides(args: argparse.Namespace, model_dir: Path) -> list[str]:
    """The presets resized to the task and the two-rank CPU run."""
    return [
        f"model.path={model_dir}",
        f"model.tensor_parallel={args.tp}",
        "model.micro_batch_size=16",
        f"engine.tensor_parallel={args.tp}",
        "engine.max_num_seqs=64",
        "rollout.max_prompt_length=28",
        "rollout.max_response_length=4",
        "rollout.num_samples_per_prompt=8",
        "algo.reward_shaping.buffer_length=2",
        "train.prompts_per_step=16",
        "train.mini_batch_prompts=8",
        f"train.total_steps={args.steps}",
        f"train.seed={args.seed}",
        f"optim.lr={args.lr}",
        "optim.warmup_steps=0",
        "optim.weight_decay=0",
    ]


def main(argv: list[str] | None = None) -> int:
    from megatron_hapo.parallel.local_launch import run_local_ranks  # noqa: PLC0415
    from megatron_hapo.trainer.plots import plot  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every preset")
    parser.add_argument("--presets", nargs="+", default=["hapo", "dapo"])
    parser.add_argument("--steps", type=int, default=60, help="RL steps per preset")
    parser.add_argument("--warmup-steps", type=int, default=15, help="supervised warm-up steps (32 examples each)")
    parser.add_argument("--warmup-lr", type=float, default=2e-3)
    parser.add_argument("--max-addend", type=int, default=1, help="b in a + b = ranges over 0..max_addend")
    parser.add_argument("--tp", type=int, default=2, help="ranks (Megatron TP and vLLM TP)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-interval", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/rl_demo"))
    args = parser.parse_args(argv)
    args.presets, args.overrides = split_overrides(args.presets, args.overrides)
    prepare_run_dir(args.run_dir)
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"  # vLLM's records go to the ranks' log file, not the console
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        write_tiny_llama(model_dir, vocab=VOCAB, hidden=HIDDEN, eos=EOS)
        task = modular_sum_task(args.max_addend, EOS, seed=args.seed)
        job = DemoJob(
            args.presets,
            [*job_overrides(args, model_dir), *args.overrides],
            task,
            args.run_dir,
            warmup_steps=args.warmup_steps,
            warmup_lr=args.warmup_lr,
            reward_workers=1,
            eval_interval=args.eval_interval,
        )
        run_local_ranks(run_presets, args.tp, job, device="cpu")
    window = max(1, min(5, args.steps // 3))
    rows = summary_rows(args.run_dir, args.presets, window)
    plot([args.run_dir / preset for preset in args.presets], args.run_dir / "curves.png")
    print(f"\n{'preset':<8}{f'accuracy first {window}':>18}{f'last {window}':>9}{'samples':>9}{'final avg@8':>13}")
    for row in rows:
        final = "" if row.final_eval is None else f"{row.final_eval:.3f}"
        print(f"{row.preset:<8}{row.first:>18.3f}{row.last:>9.3f}{row.samples:>9}{final:>13}")
    print(json.dumps({row.preset: {"first": row.first, "last": row.last, "samples": row.samples} for row in rows}))
    print(f"curves: {args.run_dir / 'curves.png'}; metrics: {args.run_dir}/<preset>/metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
