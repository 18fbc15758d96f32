"""One RL step: generate -> reward -> shape -> filter -> advantages -> old log-probs and stats -> update -> sync.

This is the loop body of the trainer, written to read as the pseudocode of the algorithm. Every rank runs it;
the engine returns the same responses on every rank of one model replica (rollout TP spanning the trainer's
TP x PP group, or identical seeds), so all ranks of a replica build the same batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from megatron_hapo.models.provider import sync_params
from megatron_hapo.parallel.collectives import (
    check_same_on_ranks,
    group_rank_size,
    objects_from_last_stage,
    rows_from_owners,
)
from megatron_hapo.parallel.policy_loss import (
    LogProbEntropyStep,
    ParallelGroups,
    PolicyLossStep,
    check_loss_setup,
    plan_minibatch,
    pooled_entropy_stats,
    stats_from_last_stage,
)
from megatron_hapo.parallel.runtime import all_gather_objects, max_over_ranks, on_gpu
from megatron_hapo.rollout.engine import Response, RolloutEngine, SamplingSettings, temperature_metrics
from megatron_hapo.rollout.weight_sync import SyncPlan, sync_weights, verify_sync
from megatron_hapo.trainer.batch import StepBatch
from megatron_hapo.trainer.guide import check_guide_setup, guide_rollout
from megatron_hapo.trainer.metrics import PhaseClock, entropy_stats_metrics, reduce_loss_metrics
from megatron_hapo.trainer.microbatch import BatchLayout, microbatches, run_schedule
from megatron_hapo.trainer.plan import SequencePlan

#: ``score(response token ids, answer) -> (reward, correct)`` per response.
Scorer = Callable[[Sequence[list[int]], Sequence[Any]], tuple[torch.Tensor, torch.Tensor]]


def worker_scorer(
    workers: Any,
    failure: tuple[float, bool] = (-1.0, False),
    decode: Callable[[list[list[int]]], list[str]] | None = None,
) -> Scorer:
    """A :data:`Scorer` over a :class:`~megatron_hapo.rewards.RewardWorkers` whose function returns ``(reward,
    correct)``; a response whose verification timed out, crashed or raised scores ``failure`` (and is counted).
    ``decode`` (e.g. a tokenizer's ``batch_decode``) turns the token ids into the text the verifier reads."""

    def score(token_ids: Sequence[list[int]], answers: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        responses = decode(list(token_ids)) if decode is not None else token_ids
        outcomes = workers.map(list(zip(responses, answers, strict=True)))
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
    """Sequences per micro-batch without a token budget."""
    max_tokens: int | None = None
    """Token budget of a training micro-batch (``train.max_tokens_per_microbatch``), or ``None``."""
    forward_max_tokens: int | None = None
    """Token budget of a forward-only micro-batch; ``None``: twice ``max_tokens``."""
    pack: bool = False
    """Pack several sequences into one row under the budget (``train.pack_sequences``)."""
    fused_output: bool = False
    """Log-probs and entropies without logits (``model.fused_output``)."""
    sync_tolerance: float = 1e-3
    offload: bool = False
    """``model.offload=optimizer``: optimizer state and gradient buffers leave the GPU outside the updates."""
    offloaded: bool = False

    def offload_training_state(self) -> None:
        """Move the optimizer state to CPU memory and release the gradient buffers (with ``offload``), through
        Megatron-Core's own hooks for RL (``MegatronOptimizer.offload_to_cpu``, DDP ``offload_grad_buffers``).
        Off a GPU the optimizer state stays (it is host memory already); the gradient buffers are released."""
        if self.offload and not self.offloaded:
            for chunk in self.chunks:
                chunk.offload_grad_buffers(synchronize=on_gpu(), empty_cache=on_gpu())
            self.optimizer.offload_to_cpu()
            self.offloaded = True

    def restore_training_state(self) -> None:
        """Undo :meth:`offload_training_state` before an update (the gradient buffers come back zeroed)."""
        if self.offloaded:
            self.optimizer.restore_from_cpu()
            for chunk in self.chunks:
                chunk.restore_grad_buffers(synchronize=on_gpu())
            self.offloaded = False

    @property
    def microbatch_multiple(self) -> int:
        """Each schedule call runs a multiple of this many micro-batches: with virtual stages, Megatron's
        interleaved schedule takes them in groups of the pipeline size (``microbatch_group_size_per_vp_stage``)."""
        return group_rank_size(self.groups.pp)[1] if len(self.chunks) > 1 else 1

    def layout(self, *, forward_only: bool = False) -> BatchLayout:
        """How this actor cuts a share of sequences into micro-batches (training or forward-only)."""
        budget = self.max_tokens
        if forward_only and budget is not None:
            budget = self.forward_max_tokens or 2 * budget
        uniform = group_rank_size(self.groups.pp)[1] > 1 and not self.chunks[0].config.variable_seq_lengths
        return BatchLayout(
            micro_batch_size=self.micro_batch_size,
            max_tokens=budget,
            pack=self.pack and budget is not None,
            count_multiple=self.microbatch_multiple,
            uniform_shape=uniform,
        )


@dataclass
class StepState:
    """What one step hands to the next."""

    step: int = 0
    stats: EntropyStats | None = None
    skipped_updates: int = 0
    eval_best: tuple[float, int] | None = None
    """``(best evaluation value, its step)`` so far (kept across a resume)."""
    stopped: bool = False
    """The loop stopped early on request (a signal), after saving a checkpoint."""
    consecutive_skips: int = 0
    """Steps in a row whose every update was skipped (non-finite gradient norm)."""
    data_cursor: int = 0
    """Prompts of the seeded data order consumed so far (dynamic sampling may take several batches a step)."""
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


def _old_log_prob_and_stats(actor: Actor, batch: StepBatch, rows: torch.Tensor, algo: Any) -> tuple[EntropyStats, bool]:
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


def _update(actor: Actor, algo: Any, batch: StepBatch, local: torch.Tensor, stats: EntropyStats) -> dict:
    """One optimizer step on a mini-batch of which ``local`` are this data-parallel rank's rows; a non-finite
    gradient norm skips it. Returns the loss metrics of the last pipeline stage, on every stage."""
    mbs, _ = microbatches(batch, local, actor.layout(), train=True)
    plan = plan_minibatch(mbs, algo, actor.groups, entropy_stats=stats)
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
    metrics = None
    if outputs:  # the last stage: the metrics of the whole mini-batch, every DP x CP rank's micro-batches
        local = [{name: float(value) for name, value in out.items()} for out in outputs]
        metrics = reduce_loss_metrics([out for part in all_gather_objects(local, actor.groups.dp_cp) for out in part])
    metrics = objects_from_last_stage(metrics, actor.groups.pp)
    return {**metrics, "grad_norm": grad_norm, "update_skipped": float(skipped)}


def _updates(actor: Actor, config: Any, batch: StepBatch, plan: SequencePlan, step_stats: EntropyStats) -> dict:
    """PPO epochs over the plan's mini-batches; each metric is averaged over the updates that have it (an update
    of guide sequences only has no on-policy clip fractions)."""
    algo = config.algo
    on_policy = batch.on_policy_mask()
    results = []
    for _ in range(config.train.ppo_epochs):
        for rows in plan.minibatches:
            local = plan.local(rows)
            stats = step_stats
            if algo.entropy.scope == "minibatch":  # each token of the mini-batch once, on the rank that trains it
                stats = pooled_entropy_stats([batch.entropy[local]], [on_policy[local]], algo, actor.groups)
            results.append(_update(actor, algo, batch, local, stats))
    names = {name for r in results for name in r} - {"update_skipped"}
    out = {name: sum(r[name] for r in results if name in r) / sum(name in r for r in results) for name in names}
    out["updates_skipped"] = float(sum(r["update_skipped"] for r in results))
    out["optimizer_steps"] = float(len(results))
    return out


#: Seed offset between generation rounds of one step (steps are 1 apart; requests add their index).
ROUND_SEED_OFFSET = 1_000_000_007
#: ``more_prompts(count) -> (prompts, answers)``: the next prompts of the data order, for extra generation rounds.
PromptSource = Callable[[int], tuple[list[list[int]], list[Any]]]


@dataclass
class Generated:
    """The responses of one step's generation rounds, scored and filtered."""

    prompts: list[list[int]]
    answers: list[Any]
    responses: list[Response]
    rewards: torch.Tensor
    correct: torch.Tensor
    keep: torch.Tensor
    """``[P * n]`` bool: the groups the filter keeps, at most the step's number of prompts."""
    rounds: int
    sampling: SamplingSettings | None = None
    """The first round's sampling settings (the guide policy samples like it)."""


def _generate_rounds(
    engine: RolloutEngine,
    score: Scorer,
    *,
    prompts: Sequence[list[int]],
    answers: Sequence[Any],
    more_prompts: PromptSource | None,
    config: Any,
    state: StepState,
    clock: PhaseClock,
) -> Generated:
    """Generate, score and filter; with a group filter (DAPO dynamic sampling, spec 1.2) generate further rounds
    of as many new prompts until the kept groups reach the step's number of prompts (extra ones are dropped) or
    ``algo.group_filter.max_generation_rounds`` is spent (then the step trains on what it kept, see
    docs/ALGORITHMS.md)."""
    algo, n, target = config.algo, config.rollout.num_samples_per_prompt, len(prompts)
    filtering = algo.group_filter.kind != "none" and more_prompts is not None
    limit = algo.group_filter.max_generation_rounds
    out = Generated([], [], [], torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool), 0)
    batch, batch_answers = list(prompts), list(answers)
    while True:
        sampling = SamplingSettings.for_training(
            algo.sampling,
            max_tokens=config.rollout.max_response_length,
            seed=config.train.seed * 1_000_003 + state.step + out.rounds * ROUND_SEED_OFFSET,
        )
        out.sampling = out.sampling or sampling
        with clock("generate"):
            new = engine.generate(batch, n, sampling, state.stats)
        with clock("reward"):
            rewards, correct = score([r.token_ids for r in new], [batch_answers[r.prompt_index] for r in new])
        offset = len(out.prompts)
        out.responses += [dataclasses.replace(r, prompt_index=r.prompt_index + offset) for r in new]
        out.prompts, out.answers = out.prompts + batch, out.answers + batch_answers
        out.rewards, out.correct = torch.cat([out.rewards, rewards.float()]), torch.cat([out.correct, correct.bool()])
        out.rounds += 1
        group_ids = torch.arange(len(out.prompts)).repeat_interleave(n)
        out.keep = keep_groups(algo, out.correct.float(), group_ids)
        kept = out.keep.view(-1, n)[:, 0].nonzero().flatten()
        if not filtering or len(kept) >= target or (limit > 0 and out.rounds >= limit):
            break
        batch, batch_answers = more_prompts(target)
    per_group = out.keep.view(-1, n)  # a view: clearing rows clears out.keep
    per_group[kept[target:]] = False  # exactly the step's number of groups, as verl truncates
    return out


def rl_step(
    actor: Actor,
    engine: RolloutEngine,
    score: Scorer,
    *,
    prompts: Sequence[list[int]],
    answers: Sequence[Any],
    config: Any,
    state: StepState,
    guide_engine: RolloutEngine | None = None,
    more_prompts: PromptSource | None = None,
) -> dict:
    """One RL step on ``prompts``; returns its metrics and advances ``state`` (statistics for the next rollout).

    ``guide_engine`` serves the frozen guide policy of mixed-policy algorithms (``algo.guide_policy.kind``);
    ``more_prompts`` supplies the further generation rounds of dynamic sampling (without it: one round).
    """
    algo, rollout, n = config.algo, config.rollout, config.rollout.num_samples_per_prompt
    check_loss_setup(algo, actor.groups)  # refuse an unsupported composition before spending a rollout on it
    check_guide_setup(algo, guide_engine)
    clock = PhaseClock()
    served = getattr(engine, "requests_served", None)  # a DividedEngine counts its replica's requests
    generated = _generate_rounds(
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
    prompts, answers, responses = generated.prompts, generated.answers, generated.responses
    rewards, correct, keep = generated.rewards, generated.correct, generated.keep
    batch = StepBatch.from_responses(prompts, responses, max_response_length=rollout.max_response_length)
    check_same_on_ranks("the rollout batch", batch.tokens, actor.groups.dp)
    num_on_policy, lengths = batch.num_sequences, batch.response_lengths
    with clock("guide") if guide_engine is not None else contextlib.nullcontext():
        guide = guide_rollout(
            guide_engine,
            score,
            prompts=prompts,
            answers=answers,
            correct=correct.bool(),
            n=n,
            sampling=generated.sampling,
            config=config,
        )
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
    with clock("old_log_prob"):
        forward_rows = plan.forward_rows()
        stats, last_stage = _old_log_prob_and_stats(actor, batch, forward_rows, algo)
    metrics = {
        "reward_mean": float(rewards.mean()),
        "accuracy": float(correct.float().mean()),
        "response_length_mean": float(lengths.float().mean()),
        **temperature_metrics(responses),
        **entropy_stats_metrics(stats),
    }
    policy = slice(0, num_on_policy)
    mismatch = rollout_mismatch_metrics(
        batch.old_log_prob[policy], batch.rollout_log_prob[policy], batch.response_mask[policy] & last_stage
    )
    metrics.update({name: float(value) for name, value in mismatch.items()})
    metrics["kept_groups"] = float(keep.view(len(prompts), n)[:, 0].sum())
    metrics["generation_rounds"] = float(generated.rounds)
    metrics["forward_only_sequences"] = max_over_ranks(float(len(forward_rows)))  # the busiest DP rank's
    if served is not None:  # the busiest engine replica's requests (all of them without division)
        metrics["rollout_requests_per_engine"] = max_over_ranks(float(engine.requests_served - served))
    if guide is not None:
        metrics["guide_groups"] = float(len(guide.routed_prompts))
        metrics["guide_accuracy"] = float(guide.correct.float().mean())
    if bool(keep.any()) or guide is not None:
        _fill_advantages(config, generated, batch)
        with clock("train"):
            actor.restore_training_state()
            metrics.update(_updates(actor, config, batch, plan, stats))
            actor.offload_training_state()  # before the engine wakes for the sync
        state.skipped_updates += int(metrics["updates_skipped"])
    with clock("sync"):  # also after a step that trained nothing: a level-2 sleep dropped the engine's weights
        metrics.update(sync_and_verify(actor, engine))  # wakes the engine for the next rollout or an evaluation
    total_tokens = int(batch.lengths[policy].sum())
    metrics.update(clock.metrics(response_tokens=int(lengths.sum()), total_tokens=total_tokens))
    state.stats, state.step = stats, state.step + 1
    state.metrics.append(metrics)
    return metrics


def _fill_advantages(config: Any, generated: Generated, batch: StepBatch) -> None:
    """Shaped rewards -> advantages of the kept groups and rollout-correction weights, into ``batch``'s policy
    rows (the guide's rows came with their own advantages, and weight 1)."""
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
        response_mask,
        **ROLLOUT_CORRECTION.params(correction.kind, correction),
    )
    if weights is not None:
        batch.weights = torch.ones(batch.response_mask.shape)
        batch.weights[policy] = weights


def per_token(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[M]`` per-sequence or ``[M, L]`` per-token advantages -> ``[M, L]`` (0 beyond each response)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    return advantages * response_mask


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
