"""Megatron self-check: a tiny Megatron-Core GPT learns the toy task with HAPO, tensor-parallel, on CPU.

The same code path the cluster runs, at toy size: ``--tp`` gloo ranks (CPU patches of
``parallel.megatron_cpu``) hold a vocabulary-sharded GPT; each step samples responses with the configured
sampling kind (HAPO: adaptive temperature from the previous step's EntropyStats) over the gathered logits,
scores them with the toy verifier, computes advantages, then runs Megatron's ``get_forward_backward_func``
twice: forward-only for the old log-probs, entropies and the pooled statistics, and training with the
``parallel.policy_loss`` step (exact token-mean over the micro-batches), followed by an AdamW step.

    python -m megatron_hapo.megatron_selfcheck                  # HAPO preset, TP2, 40 steps
    python -m megatron_hapo.megatron_selfcheck configs/algo/dapo.yaml --tp 1 --steps 40

Exit status 0 when the accuracy rose by at least ``--min-gain``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from megatron_hapo.algos import SAMPLING, AdvantageInputs, compute_advantages, keep_groups, shape_rewards
from megatron_hapo.parallel import runtime
from megatron_hapo.parallel.collectives import gather_vocab_shards
from megatron_hapo.parallel.policy_loss import (
    LogProbEntropyStep,
    ParallelGroups,
    PolicyLossStep,
    PolicyMicroBatch,
    plan_minibatch,
    pooled_entropy_stats,
)
from megatron_hapo.selfcheck import EOS, PRESET_DIR, TARGET, ToyTask, toy_config


def _sample(model: Any, prompts: torch.Tensor, algo: Any, stats: Any, gen: torch.Generator) -> torch.Tensor:
    """``[N, 1 + L]`` prompt + sampled response tokens (identical on every TP rank: same logits, same seed)."""
    groups = ParallelGroups.from_megatron()
    tokens = prompts.unsqueeze(-1)
    sampling = algo.sampling
    with torch.no_grad():
        for _ in range(ToyTask.max_len):
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            logits = gather_vocab_shards(model(tokens, positions, None)[:, -1].float(), groups.tp)
            temp = SAMPLING.get(sampling.kind).fn(logits, stats, **SAMPLING.params(sampling.kind, sampling))
            probs = torch.softmax(logits / temp.unsqueeze(-1), dim=-1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return tokens


def _response_mask(tokens: torch.Tensor) -> torch.Tensor:
    """``[N, L]`` response tokens up to and including the first EOS."""
    response = tokens[:, 1:]
    ended_before = torch.cumsum((response == EOS).long(), dim=1) - (response == EOS).long()
    return ended_before == 0


def _microbatches(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor | None,
    old_log_prob: torch.Tensor | None,
    count: int,
) -> list[PolicyMicroBatch]:
    """Split ``[N, 1 + L]`` sequences into ``count`` micro-batches aligned for next-token prediction."""
    seq_mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)  # position t predicts token t + 1
    targets = torch.roll(tokens, -1, dims=1)
    padded = None if advantages is None else torch.cat([advantages, torch.zeros_like(advantages[:, :1])], dim=1)
    out = []
    for rows in torch.arange(tokens.shape[0]).chunk(count):
        out.append(
            PolicyMicroBatch(
                tokens=tokens[rows],
                position_ids=torch.arange(tokens.shape[1]).expand(len(rows), -1),
                targets=targets[rows],
                mask=seq_mask[rows],
                advantages=None if padded is None else padded[rows],
                old_log_prob=None if old_log_prob is None else old_log_prob[rows],
            )
        )
    return out


def _rl_step(chunks: list, optim: torch.optim.Optimizer, config: Any, stats: Any, gen: torch.Generator) -> tuple:
    """One RL step; returns ``(accuracy, EntropyStats for the next rollout)``."""
    from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: PLC0415

    algo, task, groups = config.algo, ToyTask(), ParallelGroups.from_megatron()
    group_ids = torch.arange(task.prompts).repeat_interleave(task.group_size)
    tokens = _sample(
        chunks[0], torch.randint(1, task.vocab, (task.prompts,), generator=gen)[group_ids], algo, stats, gen
    )
    mask = _response_mask(tokens)
    correct = ((tokens[:, 1:] == TARGET) & mask).sum(-1) >= task.min_hits
    schedule = partial(get_forward_backward_func(), model=chunks, seq_length=tokens.shape[1], micro_batch_size=16)
    mbs = _microbatches(tokens, mask, None, None, tokens.shape[0] // 16)
    outs = schedule(
        forward_step_func=LogProbEntropyStep(groups, task.vocab),
        data_iterator=iter(mbs),
        num_microbatches=len(mbs),
        forward_only=True,
    )
    old_log_prob = torch.cat([o["log_prob"] for o in outs])
    entropy = torch.cat([o["entropy"] for o in outs])
    next_stats = pooled_entropy_stats([entropy], [m.mask for m in mbs], algo, groups)
    rewards = shape_rewards(algo, correct.float() * 2 - 1, mask.sum(-1), max_length=task.max_len)
    keep = keep_groups(algo, correct.float(), group_ids)
    if bool(keep.any()):
        inputs = AdvantageInputs(rewards[keep], group_ids[keep], mask[keep], correct[keep], entropy[keep, :-1])
        advantages = compute_advantages(algo, inputs)
        mbs = _microbatches(tokens[keep], mask[keep], advantages, old_log_prob[keep], 2)
        plan = plan_minibatch(mbs, algo, groups, entropy_stats=next_stats)
        optim.zero_grad()
        schedule(
            forward_step_func=PolicyLossStep(algo, groups, plan, task.vocab),
            data_iterator=iter(mbs),
            num_microbatches=len(mbs),
            micro_batch_size=mbs[0].tokens.shape[0],
            forward_only=False,
        )
        optim.step()
    return float(correct.float().mean()), next_stats


def _rank_main(rank: int, world: int, args: dict, result_file: str) -> None:
    runtime.quiet_logs()
    from megatron_hapo.models import TinyGPTShape, build_tiny_gpt  # noqa: PLC0415

    runtime.join_process_group("gloo", init_method=f"file://{result_file}.rdv", rank=rank, world_size=world)
    runtime.initialize_model_parallel(tp=world, seed=args["seed"])
    config = toy_config(Path(args["config"]), args["overrides"])
    torch.manual_seed(args["seed"])
    shape = TinyGPTShape(vocab_size=ToyTask.vocab, seq_length=1 + ToyTask.max_len, num_layers=2)
    chunks = build_tiny_gpt(shape, ddp=False, seed=args["seed"])
    optim = torch.optim.AdamW([p for c in chunks for p in c.parameters()], lr=args["lr"], weight_decay=0.0)
    gen, stats, accuracy = torch.Generator().manual_seed(args["seed"]), None, []
    for _ in range(args["steps"]):
        acc, stats = _rl_step(chunks, optim, config, stats, gen)
        accuracy.append(acc)
    if rank == 0:
        Path(result_file).write_text(json.dumps(accuracy))
    runtime.leave_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=str(PRESET_DIR / "hapo.yaml"), help="algorithm preset")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (gloo processes)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--min-gain", type=float, default=0.2, help="required accuracy gain (last 5 - first 5)")
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU self-check: its ranks take the CPU path even on a GPU node
    with tempfile.TemporaryDirectory() as tmp:
        result_file = str(Path(tmp) / "accuracy.json")
        settings = {**vars(args), "overrides": overrides}
        mp.spawn(_rank_main, args=(args.tp, settings, result_file), nprocs=args.tp, join=True)
        accuracy = json.loads(Path(result_file).read_text())
    first, last = sum(accuracy[:5]) / 5, sum(accuracy[-5:]) / 5
    print(
        f"Megatron GPT, TP{args.tp}, {Path(args.config).stem}: accuracy {first:.3f} (first 5 steps) -> "
        f"{last:.3f} (last 5)"
    )
    ok = last - first >= args.min_gain
    print("megatron self-check passed" if ok else "megatron self-check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
