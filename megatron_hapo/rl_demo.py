"""The whole RL stack on a CPU: a tiny Llama learns modular addition with real Megatron and real vLLM.

    .venv/bin/python -m megatron_hapo.rl_demo [--presets hapo dapo] [--steps 60] [--warmup-steps 15] [--tp 2]

The task (``rewards.synthetic.modular_sum_prompts``): the prompt is ``a + b =`` over ten digit tokens, the
answer the digit of ``(a + b) mod 10``; a response is right when its first token is that digit. A random model
is right about 0.2 % of the time, so, as in the usual recipe, a short supervised warm-up on reference answers
comes first (``trainer.warmup``): it lifts the accuracy to where groups have mixed rewards.

For each preset: two gloo ranks hold a Megatron GPT at TP2 (Megatron DDP + Adam) and a colocated vLLM engine at
rollout TP2. Both presets start from the same warm-up (same seed). Every RL step generates groups of responses,
scores them in verifier worker processes, computes advantages, updates the model and pushes the weights into vLLM
with a verified sync (``trainer.loop.train``); avg@8 / pass@8 on all 100 prompts are measured every 10 steps.
It ends with a table of the accuracy after the warm-up and at the end of RL per preset, and draws both runs'
curves into ``RUN_DIR/curves.png`` (metrics in ``RUN_DIR/<preset>/metrics.jsonl``; default ``runs/rl_demo``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "algo"
VOCAB = 512
EOS = 2


def _tiny_llama(path: Path) -> None:
    import transformers  # noqa: PLC0415

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=EOS,
        bos_token_id=1,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).float().save_pretrained(path, safe_serialization=True)


def _all_sums(max_addend: int) -> tuple[list[list[int]], list[int]]:
    """Every distinct prompt of the task (the evaluation set)."""
    from megatron_hapo.rewards.synthetic import DIGIT_TOKENS, EQUALS_TOKEN, PLUS_TOKEN  # noqa: PLC0415

    pairs = [(a, b) for a in range(10) for b in range(max_addend + 1)]
    prompts = [[DIGIT_TOKENS[a], PLUS_TOKEN, DIGIT_TOKENS[b], EQUALS_TOKEN] for a, b in pairs]
    return prompts, [DIGIT_TOKENS[(a + b) % 10] for a, b in pairs]


def _rank(rank: int, world: int, args: argparse.Namespace, preset: str, dirs: tuple[Path, Path]) -> None:
    """One rank of one preset's run; ``dirs`` = (model directory, run directory)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: PLC0415

    from megatron_hapo.config import load_config  # noqa: PLC0415
    from megatron_hapo.models import HFCheckpoint, build_gpt, load_hf_weights, read_decoder_spec  # noqa: PLC0415
    from megatron_hapo.parallel import runtime  # noqa: PLC0415
    from megatron_hapo.parallel.policy_loss import ParallelGroups  # noqa: PLC0415
    from megatron_hapo.rewards import RewardWorkers, first_token_equals, modular_sum_prompts  # noqa: PLC0415
    from megatron_hapo.rollout.vllm_engine import VLLMConfig, VLLMEngine  # noqa: PLC0415
    from megatron_hapo.rollout.weight_sync import build_sync_plan  # noqa: PLC0415
    from megatron_hapo.trainer.evaluation import EvalSettings  # noqa: PLC0415
    from megatron_hapo.trainer.loop import LoopSettings, train  # noqa: PLC0415
    from megatron_hapo.trainer.step import Actor, worker_scorer  # noqa: PLC0415
    from megatron_hapo.trainer.warmup import supervised_warmup  # noqa: PLC0415

    model_dir, run_dir = dirs
    runtime.quiet_logs()
    runtime.initialize_model_parallel(world, 1, seed=args.seed)
    config = load_config(
        PRESET_DIR / f"{preset}.yaml",
        [
            "rollout.num_samples_per_prompt=8",
            "rollout.max_response_length=4",
            "algo.reward_shaping.buffer_length=2",
            "train.prompts_per_step=16",
            "train.mini_batch_prompts=8",
            f"train.total_steps={args.steps}",
            f"train.seed={args.seed}",
            f"optim.lr={args.lr}",
            "optim.warmup_steps=0",
            "optim.weight_decay=0",
        ],
    )
    spec = read_decoder_spec(model_dir)
    chunks = build_gpt(spec, ddp=True)
    load_hf_weights(chunks, spec, HFCheckpoint(model_dir).__getitem__, tp_rank=rank, tp_size=world)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.0, clip_grad=1.0, params_dtype=torch.float32),
        chunks,
    )
    groups = ParallelGroups.from_megatron()
    engine = VLLMEngine(
        model_dir, VLLMConfig(tensor_parallel_size=world, max_model_len=32, max_num_seqs=64, dtype="float32")
    )
    actor = Actor(
        chunks,
        optimizer,
        spec,
        groups,
        build_sync_plan(chunks, spec, groups, bucket_bytes=2**22),
        probe=[5, 17, 99, 300, 7, 11, 12],
        micro_batch_size=16,
    )
    workers = RewardWorkers(first_token_equals, workers=1, timeout_s=30.0, failure_value=(-1.0, False))
    prompts, answers = modular_sum_prompts(256, args.seed, max_addend=args.max_addend)
    eval_prompts, eval_answers = _all_sums(args.max_addend)
    settings = LoopSettings(run_dir, eval_interval=10, eval_settings=EvalSettings(max_tokens=4))
    try:
        examples = [(p, [a, EOS]) for p, a in zip(prompts, answers, strict=True)]
        nll = supervised_warmup(
            actor, engine, examples, steps=args.warmup_steps, batch_size=32, lr=args.warmup_lr, seed=args.seed
        )
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "warmup.json").write_text(json.dumps({"nll": nll}))
        train(
            actor,
            engine,
            worker_scorer(workers),
            config,
            settings,
            prompts=prompts,
            answers=answers,
            eval_prompts=eval_prompts,
            eval_answers=eval_answers,
        )
    finally:
        workers.close()
        engine.close()


def _summary(run_dir: Path, presets: list[str], window: int) -> list[tuple[str, float, float]]:
    from megatron_hapo.trainer.metrics import read_metrics  # noqa: PLC0415

    rows = []
    for preset in presets:
        accuracy = [row["accuracy"] for row in read_metrics(run_dir / preset)]
        rows.append((preset, sum(accuracy[:window]) / window, sum(accuracy[-window:]) / window))
    return rows


def main(argv: list[str] | None = None) -> int:
    from megatron_hapo.parallel.local_launch import run_local_ranks  # noqa: PLC0415
    from megatron_hapo.trainer.plots import plot  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["hapo", "dapo"])
    parser.add_argument("--steps", type=int, default=60, help="RL steps per preset")
    parser.add_argument("--warmup-steps", type=int, default=15, help="supervised warm-up steps (32 examples each)")
    parser.add_argument("--warmup-lr", type=float, default=2e-3)
    parser.add_argument("--max-addend", type=int, default=1, help="b in a + b = ranges over 0..max_addend")
    parser.add_argument("--tp", type=int, default=2, help="ranks (Megatron TP and vLLM TP)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--run-dir", type=Path, default=Path("runs/rl_demo"), help="metrics per preset and curves.png go here"
    )
    args = parser.parse_args(argv)
    run_dir = args.run_dir
    for preset in args.presets:
        if (run_dir / preset / "metrics.jsonl").exists():
            parser.error(f"{run_dir / preset} holds an earlier run; remove it or pass --run-dir")
    with tempfile.TemporaryDirectory() as tmp:
        _tiny_llama(Path(tmp) / "model")
        for preset in args.presets:
            run_local_ranks(_rank, args.tp, args, preset, (Path(tmp) / "model", run_dir / preset))
    window = max(1, min(5, args.steps // 3))
    rows = _summary(run_dir, args.presets, window)
    plot([run_dir / preset for preset in args.presets], run_dir / "curves.png")
    print(f"\npreset   accuracy (first {window} steps)   accuracy (last {window} steps)")
    for preset, first, last in rows:
        print(f"{preset:8s} {first:27.3f} {last:26.3f}")
    print(json.dumps({preset: {"first": first, "last": last} for preset, first, last in rows}))
    print(f"curves: {run_dir / 'curves.png'}; metrics: {run_dir}/<preset>/metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
