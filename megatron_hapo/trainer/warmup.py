"""Supervised warm-up before RL: a few steps of next-token likelihood on reference answers.

A random or weak model may answer no prompt correctly; then every group has the same reward, every advantage
is zero and RL cannot start. A short supervised warm-up on reference answers lifts the first rewards above
zero (the usual "SFT, then RL" recipe). It trains the same Megatron model with the same optimizer through
``get_forward_backward_func``; the loss is the token-mean negative log-likelihood of the answer tokens, exact
over the DP / TP / PP / micro-batch split. The engine is synced (and verified) once at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_hapo.parallel.collectives import group_rank_size, objects_from_last_stage
from megatron_hapo.parallel.supervised_loss import SupervisedStep
from megatron_hapo.parallel.token_mean import global_denominator
from megatron_hapo.rollout.engine import Response, RolloutEngine
from megatron_hapo.trainer.batch import StepBatch
from megatron_hapo.trainer.loop import set_learning_rate
from megatron_hapo.trainer.microbatch import microbatches, run_schedule
from megatron_hapo.trainer.plan import balanced_split
from megatron_hapo.trainer.step import Actor, sync_and_verify


def supervised_warmup(
    actor: Actor,
    engine: RolloutEngine | None,
    examples: Sequence[tuple[list[int], list[int]]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
) -> list[float]:
    """``steps`` optimizer steps on ``(prompt, answer tokens)`` pairs drawn in a seeded order; every rank calls it.

    Returns the mean negative log-likelihood per step (the same on every rank). The optimizer's learning rate is
    set to ``lr`` for the warm-up; the RL loop sets its own afterwards.
    """
    if not examples or steps <= 0:
        raise ValueError(f"the warm-up needs examples and steps > 0, got {len(examples)} examples, {steps} steps")
    set_learning_rate(actor.optimizer, lr)
    actor.restore_training_state()  # the optimizer state back on the device (model.offload)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    width = max(len(answer) for _, answer in examples)
    losses = []
    for step in range(steps):
        picked = [examples[order[(step * batch_size + i) % len(order)]] for i in range(batch_size)]
        responses = [
            Response(prompt_index=i, token_ids=list(answer), log_probs=torch.zeros(len(answer)), finish_reason="stop")
            for i, (_, answer) in enumerate(picked)
        ]
        batch = StepBatch.from_responses([p for p, _ in picked], responses, max_response_length=width)
        losses.append(_supervised_update(actor, batch))
    if engine is not None:
        sync_and_verify(actor, engine)
    return losses


def _supervised_update(actor: Actor, batch: StepBatch) -> float:
    """One optimizer step on this DP rank's share of ``batch``; returns the mini-batch's mean NLL."""
    dp_rank, dp_size = group_rank_size(actor.groups.dp)
    local = balanced_split(torch.arange(batch.num_sequences), batch.lengths, dp_size)[dp_rank]
    mbs, _ = microbatches(batch, local, actor.layout())
    denominator = global_denominator([mb.mask for mb in mbs], "token-mean", dp_group=actor.groups.dp_cp)
    for chunk in actor.chunks:
        chunk.zero_grad_buffer()
    actor.optimizer.zero_grad()
    step = SupervisedStep(actor.groups, denominator, len(mbs), actor.spec.vocab_size)
    outputs = run_schedule(step, mbs, actor.chunks, forward_only=False)
    actor.optimizer.step()
    local_nll = sum(float(o["nll_share"]) for o in outputs) if outputs else None
    nll = objects_from_last_stage(local_nll, actor.groups.pp)
    assert nll is not None  # every stage holds the last stage's
    return float(nll)
