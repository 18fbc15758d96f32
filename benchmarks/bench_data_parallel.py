#!/usr/bin/env python
"""The step's work divided over data-parallel ranks (issue 17): redundancy counts and phase times of one RL step.

    .venv/bin/python benchmarks/bench_data_parallel.py            # prints a markdown table (docs/PERFORMANCE.md)
    .venv/bin/python benchmarks/bench_data_parallel.py --quick    # smaller step, for a smoke run

A random float32 Llama (vocabulary 1000, hidden 512, 4 layers) trained with the HAPO preset at TP1 x DP1, DP2 and
DP4 on gloo ranks, one transformers rollout engine per rank (``engine.kind=hf``, divided by
``rollout.divided.DividedEngine``), Megatron's distributed optimizer on. Each layout takes two steps of the same
prompts and seeds (the rollouts are the same at every layout); the second one is reported:

- requests the busiest engine served / requests in the step (1 / DP when every response is generated once);
- forward-only sequences on the busiest rank / that rank's share of the batch (1 when the old-log-prob pass is
  divided);
- wall time of the step's phases. Every rank runs one torch thread, so DP2 uses both cores of a 2-core machine
  where DP1 uses one; DP4 oversubscribes such a machine (its times say nothing there).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from megatron_hapo.config import load_config
from megatron_hapo.parallel import runtime
from megatron_hapo.parallel.local_launch import run_local_ranks
from megatron_hapo.rewards import first_token_parity
from megatron_hapo.rollout.divided import DividedEngine
from megatron_hapo.rollout.factory import make_engine
from megatron_hapo.rollout.weight_sync import sync_probe
from megatron_hapo.trainer.actor import build_actor
from megatron_hapo.trainer.step import StepState, rl_step

REPO = Path(__file__).resolve().parents[1]
PHASES = ("generate", "old_log_prob", "train", "sync")


def _model(path: Path) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
        eos_token_id=2,
        bos_token_id=1,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).float().save_pretrained(path, safe_serialization=True)
    return path


def _rank(rank: int, world: int, model: Path, sizes: tuple[int, int], out: Path) -> None:
    """Two RL steps on this rank; rank 0 writes the second step's metrics (``sizes``: prompts, response tokens)."""
    torch.set_num_threads(1)
    prompts_per_step, response = sizes
    runtime.quiet_logs()
    runtime.initialize_model_parallel(1, 1)
    overrides = [
        f"model.path={model}",
        "engine.kind=hf",
        "model.micro_batch_size=4",
        "rollout.num_samples_per_prompt=4",
        f"rollout.max_response_length={response}",
        "algo.reward_shaping.buffer_length=4",
        f"train.prompts_per_step={prompts_per_step}",
        "train.mini_batch_prompts=4",
        "optim.lr=1e-4",
    ]
    config = load_config(REPO / "configs/algo/hapo.yaml", overrides)
    actor = build_actor(config)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (24,), generator=gen).tolist() for _ in range(prompts_per_step)]
    actor.probe = sync_probe(prompts)
    engine = DividedEngine(make_engine(model, config.engine, dtype="float32", max_model_len=160, seed=0))

    def score(token_ids: list[list[int]], answers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        verdicts = [first_token_parity(ids, answer) for ids, answer in zip(token_ids, answers, strict=True)]
        return torch.tensor([v[0] for v in verdicts]), torch.tensor([v[1] for v in verdicts])

    state = StepState()
    for _ in range(2):
        metrics = rl_step(
            actor,
            engine,
            score,
            prompts=prompts,
            answers=[i % 2 for i in range(len(prompts))],
            config=config,
            state=state,
        )
    times = runtime.all_gather_objects({phase: metrics[f"time_{phase}"] for phase in PHASES})
    if rank == 0:  # each phase's slowest rank (the step waits for it)
        metrics.update({f"time_{phase}": max(t[phase] for t in times) for phase in PHASES})
        out.write_text(json.dumps(metrics))


def measure(world: int, model: Path, prompts_per_step: int, response: int) -> dict:
    """The second step's metrics at TP1 x DP ``world``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "metrics.json"
        run_local_ranks(_rank, world, model, (prompts_per_step, response), out, device="cpu")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 prompts x 4 samples, 8-token responses")
    parser.add_argument("--worlds", default="1,2,4", help="data-parallel sizes to measure")
    args = parser.parse_args(argv)
    prompts_per_step, response = (8, 8) if args.quick else (16, 64)
    requests = prompts_per_step * 4
    with tempfile.TemporaryDirectory() as tmp:
        model = _model(Path(tmp) / "model")
        results = {w: measure(w, model, prompts_per_step, response) for w in map(int, args.worlds.split(","))}
    print(
        f"One HAPO step, {prompts_per_step} prompts x 4 samples, responses up to {response} tokens, TP1 x DP n "
        f"(second step; times are each phase's slowest rank, 1 torch thread per rank)\n"
    )
    base = results.get(1)
    phases = " | ".join(f"{p} s" for p in PHASES)
    print(
        f"| DP | requests per engine / step's requests | forward-only sequences per rank / its share | {phases} "
        "| step s | DP1 step / this step |"
    )
    print("|---|---|---|" + "---|" * len(PHASES) + "---|---|")
    for world, m in results.items():
        step = sum(m[f"time_{p}"] for p in PHASES)
        ratio = f"{sum(base[f'time_{p}'] for p in PHASES) / step:.2f}x" if base else "-"
        print(
            f"| {world} | {m['rollout_requests_per_engine']:.0f} / {requests} | "
            f"{m['forward_only_sequences']:.0f} / {requests / world:.0f} | "
            + " | ".join(f"{m[f'time_{p}']:.2f}" for p in PHASES)
            + f" | {step:.2f} | {ratio} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
