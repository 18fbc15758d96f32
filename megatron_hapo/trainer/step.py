"""One RL step: generate -> reward -> shape -> filter -> advantages -> old log-probs and stats -> update -> sync.

This is the loop body of the trainer, written to read as the pseudocode of the algorithm. Every rank runs it;
the engine returns the same responses on every rank of one model replica (rollout TP spanning the trainer's
TP x PP group, or identical seeds), so all ranks of a replica build the same batch.
"""

from __future__ import annotations

import contextlib
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
    needs_entropy,
    reads_old_log_prob_before_loss,
    reads_rollout_entropy,
    rollout_mismatch_metrics,
    shape_rewards,
)
from megatron_hapo.config import AlgoConfig, Config
from megatron_hapo.models.provider import sync_params
from megatron_hapo.parallel.collectives import (
    any_rank,
    check_same_on_ranks,
    group_rank_size,
    objects_from_last_stage,
    rows_from_owners,
)
from megatron_hapo.parallel.policy_loss import (
    LogProbEntropyStep,
    PolicyLossStep,
    check_loss_setup,
    plan_minibatch,
    pooled_entropy_stats,
    stats_from_last_stage,
)
from megatron_hapo.parallel.runtime import all_gather_objects, max_over_ranks
from megatron_hapo.rollout.divided import DividedEngine
from megatron_hapo.rollout.engine import RolloutEngine, temperature_metrics
from megatron_hapo.rollout.weight_sync import sync_weights, verify_sync
from megatron_hapo.trainer.actor import Actor
from megatron_hapo.trainer.batch import StepBatch, per_token
from megatron_hapo.trainer.generation import Generated, PromptSource, generate_rounds
from megatron_hapo.trainer.guide import GuideRollout, check_guide_setup, guide_rollout
from megatron_hapo.trainer.metrics import PhaseClock, entropy_stats_metrics, reduce_loss_metrics
from megatron_hapo.trainer.microbatch import microbatches, run_schedule
from megatron_hapo.trainer.plan import SequencePlan
from megatron_hapo.trainer.rollout_dump import RolloutDumps, ValueRecorder
from megatron_hapo.trainer.scoring import Scorer, worker_scorer  # noqa: F401  (re-exported)


@dataclass
class StepState:
    """What one step hands to the next."""

    step: int = 0
    stats: EntropyStats | None = None
    skipped_updates: int = 0
    eval_best: dict[str, tuple[float, int]] = field(default_factory=dict)
    """``{eval metric: (best value, its step)}`` so far (``eval/aime24/avg@8``; kept across a resume)."""
    eval_final: dict[str, float] = field(default_factory=dict)
    """``{eval metric: latest value}`` (kept across a resume: a resumed run that evaluates nothing reports it)."""
    stopped: bool = False
    """The loop stopped early on request (a signal), after saving a checkpoint."""
    consecutive_skips: int = 0
    """Steps in a row whose every update was skipped (non-finite gradient norm)."""
    data_cursor: int = 0
    """Prompts of the seeded data order consumed so far (dynamic sampling may take several batches a step)."""
    keep_rate: float | None = None
    """Share of generated groups the group filter kept, averaged over the recent steps (sizes the next step's
    first round; ``None`` before the first filtered step)."""
    metrics: list[dict] = field(default_factory=list)


def _forward_only(actor: Actor, batch: StepBatch, rows: torch.Tensor) -> None:
    """Fill ``batch.old_log_prob`` / ``batch.entropy`` (host memory) for ``rows``, this data-parallel rank's
    sequences (:meth:`SequencePlan.forward_rows`); only the last pipeline stage has outputs."""
    # a rank with no share still runs one masked micro-batch: an overlapped distributed optimizer's parameter
    # all-gather starts in the first forward, and every data-parallel rank must join it
    mbs, slots = microbatches(batch, rows, actor.layout(forward_only=True))
    step = LogProbEntropyStep(actor.groups, actor.spec.vocab_size, fused_output=actor.fused_output)
    outputs = run_schedule(step, mbs, actor.chunks, forward_only=True)
    for out, where in zip(outputs, slots, strict=False):  # no outputs off the last stage
        width = where.index.shape[1]
        for values, key in ((batch.old_log_prob, "log_prob"), (batch.entropy, "entropy")):
            values[where.rows, :width] = where.read(out[key].cpu())  # host memory, as the batch


def _old_log_prob_and_stats(
    actor: Actor, batch: StepBatch, rows: torch.Tensor, algo: AlgoConfig
) -> tuple[EntropyStats, bool]:
    """The forward-only pass divided over the data-parallel ranks: each computes only its own sequences, the
    entropy statistics pool every sequence once over the DP x CP group, and then every rank of the last stage
    holds the whole batch's old log-probs and entropies (the advantages and metrics read other ranks' rows).
    ``rows``: this rank's :meth:`SequencePlan.forward_rows`. Returns the statistics, and whether this is the last
    pipeline stage."""
    _forward_only(actor, batch, rows)
    pp_rank, pp_size = group_rank_size(actor.groups.pp)
    last_stage = pp_rank == pp_size - 1
    stats = pooled_entropy_stats([batch.entropy[rows]], [batch.response_mask[rows] & last_stage], algo, actor.groups)
    stats = stats_from_last_stage(stats if last_stage else None, actor.groups.pp)
    if last_stage:  # the policy's rows (the guide's come after them): zero but for this rank's, until summed
        policy_rows = int((~batch.guide_rows).sum())
        rows_from_owners(batch.old_log_prob[:policy_rows], actor.groups.dp)
        rows_from_owners(batch.entropy[:policy_rows], actor.groups.dp)
    return stats, last_stage


def _update(
    actor: Actor,
    algo: AlgoConfig,
    batch: StepBatch,
    local: torch.Tensor,
    stats: EntropyStats | None,
    *,
    old_is_current: bool,
    recorder: ValueRecorder | None = None,
) -> dict:
    """One optimizer step on a mini-batch of which ``local`` are this data-parallel rank's rows; a non-finite
    gradient norm skips it (``old_is_current``: :attr:`MiniBatchPlan.old_is_current`; ``recorder`` takes the loss's
    per-token values of its rows). Returns the loss metrics of the last pipeline stage, on every stage."""
    mbs, slots = microbatches(batch, local, actor.layout(), train=True)
    if recorder is not None:
        recorder.mark(mbs, [where.rows for where in slots])
    plan = plan_minibatch(mbs, algo, actor.groups, entropy_stats=stats, old_is_current=old_is_current)
    for chunk in actor.chunks:
        chunk.zero_grad_buffer()
    actor.optimizer.zero_grad()
    step = PolicyLossStep(algo, actor.groups, plan, actor.spec.vocab_size, fused_output=actor.fused_output)
    outputs = run_schedule(step, mbs, actor.chunks, forward_only=False)
    found_inf = actor.optimizer.prepare_grads()
    grad_norm = float(actor.optimizer.get_grad_norm())
    skipped = found_inf or not math.isfinite(grad_norm)
    if not skipped:  # Megatron's step clips to optim.grad_clip and updates
        skipped = not actor.optimizer.step()[0]
    metrics: dict[str, float] | None = None
    if recorder is not None and outputs:
        recorder.take(outputs, slots)
    if outputs:  # the last stage: the metrics of the whole mini-batch, every DP x CP rank's micro-batches
        shares = [{name: float(value) for name, value in out.items()} for out in outputs]
        gathered = all_gather_objects(shares, actor.groups.dp_cp)
        metrics = reduce_loss_metrics([out for part in gathered for out in part])
    metrics = objects_from_last_stage(metrics, actor.groups.pp)
    assert metrics is not None  # every stage holds the last stage's
    return {**metrics, "grad_norm": grad_norm, "update_skipped": float(skipped)}


def _updates(
    actor: Actor,
    config: Config,
    batch: StepBatch,
    plan: SequencePlan,
    step_stats: EntropyStats | None,
    *,
    old_is_current: bool,
    recorder: ValueRecorder | None = None,
) -> dict:
    """PPO epochs over the plan's mini-batches; each metric is averaged over the updates that have it (an update
    of guide sequences only has no on-policy clip fractions). ``recorder``: see :func:`_update`."""
    algo = config.algo
    on_policy = batch.on_policy_mask()
    results = []
    for _ in range(config.train.ppo_epochs):
        for rows in plan.minibatches:
            local = plan.local(rows)
            stats = step_stats
            if algo.entropy.scope == "minibatch":  # each token of the mini-batch once, on the rank that trains it
                stats = pooled_entropy_stats([batch.entropy[local]], [on_policy[local]], algo, actor.groups)
            results.append(_update(actor, algo, batch, local, stats, old_is_current=old_is_current, recorder=recorder))
    names = {name for r in results for name in r} - {"update_skipped"}
    out = {name: sum(r[name] for r in results if name in r) / sum(name in r for r in results) for name in names}
    out["updates_skipped"] = float(sum(r["update_skipped"] for r in results))
    out["optimizer_steps"] = float(len(results))
    return out


def rl_step(
    actor: Actor,
    engine: RolloutEngine,
    score: Scorer,
    *,
    prompts: Sequence[list[int]],
    answers: Sequence[Any],
    config: Config,
    state: StepState,
    guide_engine: RolloutEngine | None = None,
    more_prompts: PromptSource | None = None,
    should_stop: Callable[[], bool] | None = None,
    dumps: RolloutDumps | None = None,
) -> dict | None:
    """One RL step on ``prompts``; returns its metrics and advances ``state`` (statistics for the next rollout).
    ``guide_engine`` serves the frozen guide policy of mixed-policy algorithms (``algo.guide_policy.kind``);
    ``more_prompts`` supplies the further generation rounds of dynamic sampling (without it: one round).
    ``should_stop`` is asked between the phases (every rank; any may say yes), so that a stop signal waits for
    one phase, not a whole step: after the rollout the step is abandoned before any update (returns ``None``,
    ``state`` untouched but for ``data_cursor``, which the caller sets back); after the updates the step is
    complete and the weight sync is skipped (``metrics["stopped"] = 1``; the engine is not used again).
    ``dumps``: where a step is due, its selected responses and the loss's values go to a rollout dump."""
    algo, rollout, n = config.algo, config.rollout, config.rollout.num_samples_per_prompt
    check_loss_setup(algo, actor.groups)  # refuse an unsupported composition before spending a rollout on it
    check_guide_setup(algo, guide_engine)
    clock = PhaseClock()
    served = engine.requests_served if isinstance(engine, DividedEngine) else None  # its replica's requests
    generated = generate_rounds(
        engine,
        score,
        prompts=prompts,
        answers=answers,
        more_prompts=more_prompts,
        config=config,
        state=state,
        clock=clock,
    )
    engine.sleep()  # its GPU memory goes to the trainer until the weight sync
    if any_rank(should_stop is not None and should_stop()):
        return None  # nothing trained yet: the checkpoint of the step before holds everything
    keep = generated.keep
    batch = StepBatch.from_responses(
        generated.prompts, generated.responses, max_response_length=rollout.max_response_length
    )
    check_same_on_ranks("the rollout batch", batch.tokens, actor.groups.dp)
    num_on_policy, lengths = batch.num_sequences, batch.response_lengths
    with clock("guide") if guide_engine is not None else contextlib.nullcontext():
        guide = guide_rollout(guide_engine, score, generated, config=config)
    if guide is not None:
        batch = batch.join(guide.batch)
    plan = SequencePlan.build(
        torch.cat([keep, batch.guide_rows[num_on_policy:]]),
        n,
        config.train.mini_batch_prompts,
        num_on_policy=num_on_policy,
        dp=group_rank_size(actor.groups.dp),
        lengths=batch.lengths,
    )
    old = _old_log_prob_phase(actor, config, batch, plan, keep=keep, guide=guide, clock=clock)
    stats, computed = old.stats, old.computed
    metrics = _rollout_metrics(generated, batch, stats, computed & old.last_stage, guide)
    metrics["forward_only_sequences"] = max_over_ranks(float(old.sequences))  # the busiest DP rank's
    if isinstance(engine, DividedEngine) and served is not None:  # the busiest replica's requests
        metrics["rollout_requests_per_engine"] = max_over_ranks(float(engine.requests_served - served))
    if bool(keep.any()) or guide is not None:
        metrics.update(_train(actor, config, (generated, batch), plan, old, clock=clock, state=state, dumps=dumps))
    if any_rank(should_stop is not None and should_stop()):
        metrics["stopped"] = 1.0  # the checkpoint comes next; the next rollout, after a resume, syncs afresh
    else:
        with clock("sync"):  # also after a step that trained nothing: a level-2 sleep dropped the engine's weights
            metrics.update(sync_and_verify(actor, engine))  # wakes the engine for the next rollout or an evaluation
    total_tokens = int(batch.lengths[:num_on_policy].sum())
    metrics.update(clock.metrics(response_tokens=int(lengths.sum()), total_tokens=total_tokens))
    state.stats, state.step = stats, state.step + 1
    state.metrics.append(metrics)
    return metrics


@dataclass
class _OldLogProbs:
    """What the step's old-log-prob phase left in the batch."""

    stats: EntropyStats | None
    """The pooled entropy statistics (``None``: the pass was skipped)."""
    computed: torch.Tensor
    """``[N_policy]`` bool: the rows whose old log-probs were computed (on the last pipeline stage)."""
    last_stage: bool
    sequences: int
    """Sequences this rank's forward-only pass computed."""
    is_current: bool
    """The pass was a no-op and skipped: the loss takes its own log-probs as the old ones."""


def _old_log_prob_phase(
    actor: Actor,
    config: Config,
    batch: StepBatch,
    plan: SequencePlan,
    *,
    keep: torch.Tensor,
    guide: GuideRollout | None,
    clock: PhaseClock,
) -> _OldLogProbs:
    """The forward-only pass over this rank's rows (all generated ones when something reads the whole rollout's
    entropy, else the kept ones), or none where it is a no-op (:func:`_old_is_current`): the micro-batches then
    carry the rollout's log-probs, for the mismatch metrics of the update's forward."""
    whole_rollout = reads_rollout_entropy(config.algo)
    if _old_is_current(config, plan, guide):
        batch.old_log_prob = batch.rollout_log_prob.clone()
        pp_rank, pp_size = group_rank_size(actor.groups.pp)
        return _OldLogProbs(None, torch.zeros_like(keep), pp_rank == pp_size - 1, 0, is_current=True)
    with clock("old_log_prob"):
        rows = plan.forward_rows(untrained=whole_rollout)
        stats, last_stage = _old_log_prob_and_stats(actor, batch, rows, config.algo)
    computed = torch.ones_like(keep) if whole_rollout else keep
    return _OldLogProbs(stats, computed, last_stage, len(rows), is_current=False)


def _train(
    actor: Actor,
    config: Config,
    step_data: tuple[Generated, StepBatch],
    plan: SequencePlan,
    old: _OldLogProbs,
    *,
    clock: PhaseClock,
    state: StepState,
    dumps: RolloutDumps | None,
) -> dict:
    """Advantages, then the updates (with the training state restored, offloaded again after); a due rollout
    dump records the loss's values of its rows and is queued."""
    generated, batch = step_data
    _fill_advantages(config, generated, batch, old.computed)
    recorder = None
    if dumps is not None:
        width, n = batch.response_mask.shape[1], config.rollout.num_samples_per_prompt
        h_hat = needs_entropy(config.algo)
        recorder = dumps.recorder(state.step, generated.keep, n, width, h_hat=h_hat, groups=actor.groups)
    with clock("train"):
        actor.restore_training_state()
        metrics = _updates(actor, config, batch, plan, old.stats, old_is_current=old.is_current, recorder=recorder)
        actor.offload_training_state()  # before the engine wakes for the sync
    state.skipped_updates += int(metrics["updates_skipped"])
    if dumps is not None and recorder is not None:
        dumps.save(state.step, recorder, generated, batch, actor.groups)
    return metrics


def _rollout_metrics(
    generated: Generated,
    batch: StepBatch,
    stats: EntropyStats | None,
    computed: torch.Tensor,
    guide: GuideRollout | None,
) -> dict[str, float]:
    """What the step generated: rewards, accuracy, lengths, temperatures, entropy statistics, the rollout /
    trainer mismatch (over ``computed``, ``[N_policy]`` bool: the rows whose old log-probs this rank holds), the
    kept groups, the generation rounds and samples, and the guide's share. Without a forward-only pass (``stats``
    ``None``) the statistics are not computed and the mismatch comes from the update's forward instead."""
    responses = generated.responses
    num_on_policy = len(responses)
    metrics = {
        "reward_mean": float(generated.rewards.mean()),
        "accuracy": float(generated.correct.float().mean()),
        "response_length_mean": float(batch.response_lengths[:num_on_policy].float().mean()),
        **temperature_metrics(responses),
    }
    policy = slice(0, num_on_policy)
    if stats is not None:
        metrics.update(entropy_stats_metrics(stats))
        mismatch = rollout_mismatch_metrics(
            batch.old_log_prob[policy], batch.rollout_log_prob[policy], batch.response_mask[policy] & computed[:, None]
        )
        metrics.update({name: float(value) for name, value in mismatch.items()})
    metrics["kept_groups"] = float(generated.keep.view(len(generated.prompts), -1)[:, 0].sum())
    metrics["generation_rounds"] = float(generated.rounds)
    metrics["generated_samples"] = float(num_on_policy)
    if guide is not None:
        metrics["guide_groups"] = float(len(guide.routed_prompts))
        metrics["guide_accuracy"] = float(guide.correct.float().mean())
    return metrics


def _old_is_current(config: Config, plan: SequencePlan, guide: GuideRollout | None) -> bool:
    """Whether the forward-only pass is a no-op this step: one optimizer step (one mini-batch, one epoch) on the
    policy's own samples, and nothing reads old log-probs or entropies before the loss. The old log-probs are then
    the update's own, detached: exactly the pass's values (the weights have not moved), so ratio 1 and the same
    gradient; TRL skips the pass in the same case. ``train.old_log_prob_pass=always`` keeps it."""
    single_step = config.train.ppo_epochs == 1 and len(plan.minibatches) == 1
    return (
        config.train.old_log_prob_pass == "auto"
        and single_step
        and guide is None
        and not reads_old_log_prob_before_loss(config.algo)
    )


def _fill_advantages(config: Config, generated: Generated, batch: StepBatch, computed: torch.Tensor) -> None:
    """Shaped rewards -> advantages of the kept groups and rollout-correction weights (over ``computed``,
    ``[N_policy]`` bool: the rows with old log-probs), into ``batch``'s policy rows (the guide's rows came with
    their own advantages, and weight 1)."""
    algo, n = config.algo, config.rollout.num_samples_per_prompt
    keep, correct = generated.keep, generated.correct
    policy = slice(0, len(keep))
    response_mask = batch.response_mask[policy]
    lengths = response_mask.sum(-1)
    shaped = shape_rewards(algo, generated.rewards, lengths, max_length=config.rollout.max_response_length)
    group_ids = torch.arange(len(generated.prompts)).repeat_interleave(n)
    if bool(keep.any()):
        inputs = AdvantageInputs(
            shaped[keep], group_ids[keep], response_mask[keep], correct[keep], batch.entropy[policy][keep]
        )
        batch.advantages[policy][keep] = per_token(compute_advantages(algo, inputs), response_mask[keep])
    correction = algo.rollout_correction
    weights = ROLLOUT_CORRECTION.get(correction.kind).fn(
        batch.old_log_prob[policy],
        batch.rollout_log_prob[policy],
        response_mask & computed[:, None],
        **ROLLOUT_CORRECTION.params(correction.kind, correction),
    )
    if weights is not None:
        batch.weights = torch.ones(batch.response_mask.shape)
        batch.weights[policy] = weights


def sync_and_verify(actor: Actor, engine: RolloutEngine) -> dict:
    """Push the updated weights into the engine and verify them (raises ``WeightSyncError`` on a mismatch).

    A sleeping engine wakes its weights first and its KV cache only after the sync (verl's order: the
    trainer's sync buffers and the KV cache never hold memory at the same time)."""
    sync_params(actor.chunks)  # an overlapped distributed optimizer left the gather to the next forward
    engine.wake_up(tags=["weights"])
    report = sync_weights(engine, actor.chunks, actor.spec, actor.sync_plan, actor.groups)
    engine.wake_up(tags=["kv_cache"])
    error = verify_sync(
        engine,
        actor.chunks,
        actor.groups,
        actor.probe,
        vocab_size=actor.spec.vocab_size,
        tolerance=actor.sync_tolerance,
    )
    return {
        "sync_seconds": report.seconds,
        "sync_probe_error": error["mult_error"],
        "sync_probe_max_abs": error["max_abs"],
    }
