"""One RL step: generate -> reward -> shape -> filter -> advantages -> old log-probs and stats -> update -> sync.

This is the loop body of the trainer, written to read as the pseudocode of the algorithm. Every rank runs it;
the engine returns the same responses on every rank of one model replica (rollout TP spanning the trainer's
TP x PP group, or identical seeds), so all ranks of a replica build the same batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_hapo.algos import (
    ROLLOUT_CORRECTION,
    AdvantageInputs,
    EntropyStats,
    compute_advantages,
    keep_groups,
    rollout_mismatch_metrics,
    shape_rewards,
)
from megatron_hapo.models.hf_config import DecoderSpec
from megatron_hapo.parallel.policy_loss import (
    LogProbEntropyStep,
    ParallelGroups,
    PolicyLossStep,
    check_loss_setup,
    plan_minibatch,
    pooled_entropy_stats,
    stats_from_last_stage,
)
from megatron_hapo.rollout.engine import RolloutEngine, SamplingSettings, temperature_metrics
from megatron_hapo.rollout.weight_sync import SyncPlan, sync_weights, verify_sync
from megatron_hapo.trainer.batch import PackedRollout, microbatches, pack_rollout, position_view, response_view

#: ``score(response token ids, answer) -> (reward, correct)`` per response.
Scorer = Callable[[Sequence[list[int]], Sequence[Any]], tuple[torch.Tensor, torch.Tensor]]


def worker_scorer(workers: Any, failure: tuple[float, bool] = (-1.0, False)) -> Scorer:
    """A :data:`Scorer` over a :class:`~megatron_hapo.rewards.RewardWorkers` whose function returns ``(reward,
    correct)``; a response whose verification timed out, crashed or raised scores ``failure`` (and is counted)."""

    def score(token_ids: Sequence[list[int]], answers: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        outcomes = workers.map(list(zip(token_ids, answers, strict=True)))
        values = [o.value if o.status == "ok" else failure for o in outcomes]
        return torch.tensor([v[0] for v in values]), torch.tensor([v[1] for v in values])

    return score


@dataclass
class Actor:
    """The trainer's model replica on this rank and what its step needs."""

    chunks: list
    optimizer: Any
    spec: DecoderSpec
    groups: ParallelGroups
    sync_plan: SyncPlan
    probe: list[int]
    micro_batch_size: int = 4
    sync_tolerance: float = 1e-3


@dataclass
class StepState:
    """What one step hands to the next."""

    step: int = 0
    stats: EntropyStats | None = None
    skipped_updates: int = 0
    metrics: list[dict] = field(default_factory=list)


def _forward_only(actor: Actor, packed: PackedRollout) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Old log-probs and entropies ``[N, S]`` of the whole batch (zeros off the last stage), and whether here."""
    from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: PLC0415

    mbs = microbatches(packed, torch.arange(packed.num_sequences), actor.micro_batch_size)
    outputs = get_forward_backward_func()(
        forward_step_func=LogProbEntropyStep(actor.groups, actor.spec.vocab_size), data_iterator=iter(mbs),
        model=actor.chunks, num_microbatches=len(mbs), seq_length=packed.tokens.shape[1],
        micro_batch_size=actor.micro_batch_size, forward_only=True,
    )  # fmt: skip
    if not outputs:
        return torch.zeros(packed.mask.shape), torch.zeros(packed.mask.shape), False
    count = packed.num_sequences  # the last micro-batch may be padded with masked copies
    log_prob, entropy = (torch.cat([o[key] for o in outputs])[:count] for key in ("log_prob", "entropy"))
    return log_prob, entropy, True


def _update(actor: Actor, algo: Any, packed: PackedRollout, rows: torch.Tensor, *, old_log_prob: torch.Tensor,
            advantages: torch.Tensor, weights: torch.Tensor | None, stats: EntropyStats) -> dict:  # fmt: skip
    """One optimizer step on the sequences ``rows``; a non-finite gradient norm skips it."""
    from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: PLC0415

    mbs = microbatches(packed, rows, actor.micro_batch_size, old_log_prob=old_log_prob, advantages=advantages,
                       loss_weights=weights)  # fmt: skip
    plan = plan_minibatch(mbs, algo, actor.groups, entropy_stats=stats)
    for chunk in actor.chunks:
        chunk.zero_grad_buffer()
    actor.optimizer.zero_grad()
    step = PolicyLossStep(algo, actor.groups, plan, actor.spec.vocab_size)
    losses = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(mbs), model=actor.chunks, num_microbatches=len(mbs),
        seq_length=packed.tokens.shape[1], micro_batch_size=actor.micro_batch_size, forward_only=False,
    )  # fmt: skip
    found_inf = actor.optimizer.prepare_grads()
    grad_norm = float(actor.optimizer.get_grad_norm())
    skipped = found_inf or not math.isfinite(grad_norm)
    if not skipped:  # Megatron's step clips to optim.grad_clip and updates
        skipped = not actor.optimizer.step()[0]
    loss = sum(float(o["loss_share"]) for o in losses) if losses else float("nan")
    return {"loss": loss, "grad_norm": grad_norm, "update_skipped": float(skipped)}


def _updates(actor: Actor, config: Any, packed: PackedRollout, keep: torch.Tensor, n: int, *, entropy: torch.Tensor,
             step_stats: EntropyStats, **tensors: torch.Tensor | None) -> dict:  # fmt: skip
    """PPO epochs over mini-batches of ``train.mini_batch_prompts`` kept groups; metrics averaged over updates."""
    algo = config.algo
    kept_groups = keep.view(-1, n)[:, 0].nonzero().flatten()
    results = []
    for _ in range(config.train.ppo_epochs):
        for groups in kept_groups.split(config.train.mini_batch_prompts):
            rows = (groups[:, None] * n + torch.arange(n)).flatten()
            stats = step_stats
            if algo.entropy.scope == "minibatch":
                stats = pooled_entropy_stats([entropy[rows]], [packed.mask[rows]], algo, actor.groups)
            results.append(_update(actor, algo, packed, rows, stats=stats, **tensors))
    out = {name: sum(r[name] for r in results) / len(results) for name in ("loss", "grad_norm")}
    out["updates_skipped"] = float(sum(r["update_skipped"] for r in results))
    out["optimizer_steps"] = float(len(results))
    return out


def rl_step(actor: Actor, engine: RolloutEngine, score: Scorer, *, prompts: Sequence[list[int]],
            answers: Sequence[Any], config: Any, state: StepState) -> dict:  # fmt: skip
    """One RL step on ``prompts``; returns its metrics and advances ``state`` (statistics for the next rollout)."""
    algo, rollout, n = config.algo, config.rollout, config.rollout.num_samples_per_prompt
    check_loss_setup(algo, actor.groups)  # refuse an unsupported composition before spending a rollout on it
    sampling = SamplingSettings.for_training(algo.sampling, max_tokens=rollout.max_response_length,
                                             seed=config.train.seed * 1_000_003 + state.step)  # fmt: skip
    responses = engine.generate(prompts, n, sampling, state.stats)
    packed = pack_rollout(prompts, responses, pad_id=0, max_response_length=rollout.max_response_length)
    group_ids = torch.arange(len(prompts)).repeat_interleave(n)
    rewards, correct = score([r.token_ids for r in responses], [answers[i] for i in group_ids.tolist()])
    lengths = packed.response_mask.sum(-1)
    old_log_prob, entropy, last_stage = _forward_only(actor, packed)
    stats = pooled_entropy_stats([entropy], [packed.mask & last_stage], algo, actor.groups)
    stats = stats_from_last_stage(stats if last_stage else None, actor.groups.pp)
    metrics = {"reward_mean": float(rewards.mean()), "accuracy": float(correct.float().mean()),
               "response_length_mean": float(lengths.float().mean()), **temperature_metrics(responses)}  # fmt: skip
    mismatch = rollout_mismatch_metrics(old_log_prob, packed.rollout_log_prob, packed.mask & last_stage)
    metrics.update({name: float(value) for name, value in mismatch.items()})
    keep = keep_groups(algo, correct.float(), group_ids)
    metrics["kept_groups"] = float(keep.view(len(prompts), n)[:, 0].sum())
    if bool(keep.any()):
        shaped = shape_rewards(algo, rewards, lengths, max_length=rollout.max_response_length)
        inputs = AdvantageInputs(shaped[keep], group_ids[keep], packed.response_mask[keep], correct[keep],
                                 response_view(packed, entropy)[keep])  # fmt: skip
        advantages = torch.zeros(packed.mask.shape)
        advantages[keep] = position_view(_subset(packed, keep), compute_advantages(algo, inputs))
        correction = algo.rollout_correction
        weights = ROLLOUT_CORRECTION.get(correction.kind).fn(
            old_log_prob, packed.rollout_log_prob, packed.mask, **ROLLOUT_CORRECTION.params(correction.kind, correction)
        )
        metrics.update(_updates(actor, config, packed, keep, n, entropy=entropy, step_stats=stats,
                                old_log_prob=old_log_prob, advantages=advantages, weights=weights))  # fmt: skip
        state.skipped_updates += int(metrics["updates_skipped"])
        metrics.update(_sync(actor, engine))
    state.stats, state.step = stats, state.step + 1
    state.metrics.append(metrics)
    return metrics


def _sync(actor: Actor, engine: RolloutEngine) -> dict:
    """Push the updated weights into the engine and verify them (raises ``WeightSyncError`` on a mismatch)."""
    report = sync_weights(engine, actor.chunks, actor.spec, actor.sync_plan, actor.groups)
    error = verify_sync(engine, actor.chunks, actor.groups, actor.probe, vocab_size=actor.spec.vocab_size,
                        tolerance=actor.sync_tolerance)  # fmt: skip
    return {"sync_seconds": report.seconds, "sync_probe_error": error}


def _subset(packed: PackedRollout, keep: torch.Tensor) -> PackedRollout:
    return PackedRollout(packed.tokens[keep], packed.mask[keep], packed.rollout_log_prob[keep],
                         packed.response_mask[keep])  # fmt: skip
