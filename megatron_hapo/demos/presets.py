"""Every algorithm preset learns a toy task through the trainer's own step (the quickstart's first stage).

    python -m megatron_hapo.demos.presets                              # every preset, 15 steps each
    python -m megatron_hapo.demos.presets --presets hapo --steps 60 algo.entropy.sign=paper

One rank on the CPU: a random 2-layer Llama (vocabulary 8) in Megatron-Core learns the counting task
(:mod:`megatron_hapo.demos.tasks`: right with two copies of token 3 before the end) with each preset in turn,
through :func:`megatron_hapo.trainer.loop.train`: the in-process transformers engine generates (with HAPO's
adaptive temperature), the verdict scores, then advantages, the Megatron forward and update, and a verified
weight sync, every step. ``mixed_dapo``'s frozen guide is the same model nudged towards token 3. Prints a
progress line per step and a table; metrics per preset in ``RUN_DIR/<preset>/metrics.jsonl``, library logs in
``RUN_DIR/log.txt``. Exit status 0 when every preset raised its accuracy by at least ``--min-gain``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from megatron_hapo.config.presets import preset_names
from megatron_hapo.demos.runner import (
    DemoJob,
    overlong_buffer_overrides,
    prepare_run_dir,
    run_presets,
    split_overrides,
    summary_rows,
)
from megatron_hapo.demos.tasks import count_task, write_count_guide, write_tiny_llama

VOCAB, HIDDEN, MAX_RESPONSE = 8, 64, 8


def job_overrides(steps: int, seed: int, lr: float, model_dir: Path) -> list[str]:
    """The presets resized to the toy task and the one-rank CPU run."""
    return [
        f"model.path={model_dir}",
        "engine.kind=hf",
        "rollout.max_prompt_length=24",
        f"rollout.max_response_length={MAX_RESPONSE}",
        "rollout.num_samples_per_prompt=8",
        "train.prompts_per_step=8",
        "train.mini_batch_prompts=4",
        "train.max_tokens_per_microbatch=256",
        f"train.total_steps={steps}",
        f"train.seed={seed}",
        f"optim.lr={lr}",
        "optim.warmup_steps=0",
        "optim.weight_decay=0",
    ]


def main(argv: list[str] | None = None) -> int:
    from megatron_hapo.parallel.local_launch import run_local_ranks  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every preset")
    parser.add_argument("--presets", nargs="+", default=preset_names(), help="default: every shipped preset")
    parser.add_argument("--steps", type=int, default=15, help="RL steps per preset")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--min-gain", type=float, default=0.2, help="required accuracy gain (last 5 - first 5 steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/presets"))
    args = parser.parse_args(argv)
    args.presets, args.overrides = split_overrides(args.presets, args.overrides)
    prepare_run_dir(args.run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, guide_dir = Path(tmp) / "model", Path(tmp) / "guide"
        write_tiny_llama(model_dir, vocab=VOCAB, hidden=HIDDEN, eos=0, seed=args.seed)
        write_count_guide(model_dir, guide_dir)
        overrides = [*job_overrides(args.steps, args.seed, args.lr, model_dir), *args.overrides]
        per_preset = {p: overlong_buffer_overrides(p, MAX_RESPONSE // 2) for p in args.presets}
        per_preset.setdefault("mixed_dapo", []).append(f"algo.guide_policy.model_path={guide_dir}")
        job = DemoJob(args.presets, overrides, count_task(VOCAB, seed=args.seed), args.run_dir, per_preset)
        run_local_ranks(run_presets, 1, job, device="cpu")
    failures = 0
    print(f"\n{'preset':<14}{'acc first':>10}{'acc last':>10}{'T min':>8}{'T max':>8}  verdict")
    for row in summary_rows(args.run_dir, args.presets, window=5):
        ok = row.last - row.first >= args.min_gain
        failures += not ok
        print(
            f"{row.preset:<14}{row.first:>10.3f}{row.last:>10.3f}{row.temp_min:>8.3f}{row.temp_max:>8.3f}  "
            f"{'learns' if ok else 'FAILED'}"
        )
    print("every preset learns" if not failures else f"FAILED: {failures} preset(s) did not learn")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
