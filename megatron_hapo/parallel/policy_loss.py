"""The policy loss inside Megatron's ``get_forward_backward_func``: forward steps and loss functions.

Megatron's schedules call ``forward_step_func(data_iterator, model) -> (output, loss_func)`` once per
micro-batch and, on the last pipeline stage only, ``loss_func(output)``. The two steps here are:

- :class:`LogProbEntropyStep` (``forward_only=True``): returns per micro-batch the log-probs of the targets and
  the full-vocabulary entropies, ``[B, S]`` each (old log-probs for the ratio, and the entropies whose
  statistics the next rollout's adaptive temperature uses). Megatron collects the returned dicts in a list.
- :class:`PolicyLossStep` (training): log-prob + entropy -> ``h_hat`` (micro-batch statistics pooled over CP,
  or given mini-batch / step statistics) -> the configured ``algos`` composition -> the loss Megatron expects,
  scaled so that the accumulated, data-parallel-reduced gradient is exactly that of the configured aggregation
  over the whole mini-batch (:mod:`megatron_hapo.parallel.token_mean`), with or without
  ``calculate_per_token_loss``. Sequences flagged ``guide_rows`` (mixed-policy DAPO) take the guide term instead,
  ``weight * aggregate(guide surrogate)``, with the guide tokens' own mini-batch denominator.

Batch contract: a :class:`PolicyMicroBatch` is already sliced for this data-parallel rank (and context-parallel
rank); position ``t`` of ``targets`` / ``mask`` / ``old_log_prob`` / ``advantages`` belongs to the logits at
position ``t`` (the next token). The model returns ``[B, S, V / tp]`` logits on the last stage (Megatron's
``GPTModel`` without labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, cast, overload

import torch
import torch.distributed as dist

from megatron_hapo.algos import (
    AGGREGATION,
    GUIDE_POLICY,
    RATIO,
    AggregationMode,
    EntropyStats,
    GuideBatch,
    aggregation_terms,
    rollout_mismatch_metrics,
)
from megatron_hapo.algos.compose import needs_entropy, token_policy_loss
from megatron_hapo.config.algo import AlgoConfig
from megatron_hapo.parallel.collectives import group_rank_size
from megatron_hapo.parallel.runtime import rank_device
from megatron_hapo.parallel.schedule_checks import check_pipeline_schedule
from megatron_hapo.parallel.stats import distributed_entropy_stats, normalize_with_stats, stats_from_last_stage
from megatron_hapo.parallel.token_mean import global_denominator, microbatch_loss, per_token_loss_outputs
from megatron_hapo.parallel.vocab_parallel import vocab_parallel_logprob_entropy


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups the loss communicates over (``None``: a group of one)."""

    tp: dist.ProcessGroup | None = None
    """Tensor-parallel group the vocabulary is sharded over."""
    dp: dist.ProcessGroup | None = None
    """Pure data-parallel group (DDP averages over ``dp x cp``; Megatron multiplies by ``cp``)."""
    cp: dist.ProcessGroup | None = None
    """Context-parallel group (ranks holding pieces of the same sequences)."""
    dp_cp: dist.ProcessGroup | None = None
    """Data x context-parallel group: every token of the mini-batch lies on exactly one rank of it."""
    pp: dist.ProcessGroup | None = None
    """Pipeline-parallel group (only its last stage computes the loss)."""

    @classmethod
    def from_megatron(cls) -> ParallelGroups:
        """The groups of an initialised ``megatron.core.parallel_state``."""
        from megatron.core import parallel_state as mpu  # noqa: PLC0415  (keep algos-only users megatron-free)

        return cls(
            tp=mpu.get_tensor_model_parallel_group(),
            dp=mpu.get_data_parallel_group(),
            cp=mpu.get_context_parallel_group(),
            dp_cp=mpu.get_data_parallel_group(with_context_parallel=True),
            pp=mpu.get_pipeline_model_parallel_group(),
        )


#: Per-token values a loss with ``record_values`` returns: the old log-prob, the entropy of its forward, the loss
#: mask and :func:`~megatron_hapo.algos.compose.token_policy_loss`'s ``record`` (``h_hat`` only where consumed).
RECORDED_VALUES = ("old_log_prob", "entropy", "mask", "ratio", "advantage", "eps_low", "eps_high", "h_hat")


@dataclass(kw_only=True)
class PolicyMicroBatch:
    """One micro-batch of prompt + response sequences (this DP / CP rank's slice)."""

    tokens: torch.Tensor
    """``[B, S]`` int64 model input."""
    position_ids: torch.Tensor
    """``[B, S]`` int64."""
    targets: torch.Tensor
    """``[B, S]`` int64 global vocabulary ids: the token following each position (any id where masked)."""
    mask: torch.Tensor
    """``[B, S]`` bool: positions whose target is a response token in the loss."""
    old_log_prob: torch.Tensor | None = None
    """``[B, S]`` behaviour-policy log-probs of ``targets`` (training only)."""
    advantages: torch.Tensor | None = None
    """``[B, S]`` or ``[B]`` advantages (training only)."""
    temperature: float | torch.Tensor = 1.0
    """Temperature the log-probs and entropies are computed at: a float or ``[B, S]``."""
    loss_weights: torch.Tensor | None = None
    """``[B, S]`` per-token loss multipliers (rollout correction, e.g. TIS weights); ``None``: all 1."""
    guide_rows: torch.Tensor | None = None
    """``[n]`` bool: sequences sampled by the frozen guide policy (mixed-policy term; their ``old_log_prob`` is
    the guide's log-prob); ``None``: none."""
    cu_seqlens: torch.Tensor | None = None
    """``[k + 1]`` int32 for a packed row (``B = 1``, the THD layout): where each of its sequences starts, the
    last entry ``S``; ``None``: each row is one sequence."""
    max_seqlen: int = 0
    """The longest sequence of a packed row."""
    sequences: torch.Tensor | None = None
    """``[n, L]`` int64 for a packed row: the flat ``[B * S]`` position of each sequence's loss tokens (-1 beyond
    them). The loss reads every per-token value through it (:meth:`per_sequence`), so per-sequence terms
    (``seq-mean-*`` aggregation, sequence-level ratios) see one sequence per row however the sequences are
    packed. ``None``: the rows are the sequences, ``n = B``."""
    record_values: bool = False
    """The loss also returns the per-token values it used (``"token_values"``: :data:`RECORDED_VALUES`, ``[B, S]``
    each in host memory; the rollout dumps)."""

    def to(self, device: torch.device) -> PolicyMicroBatch:
        """This micro-batch with every tensor on ``device`` (host-to-device copies are asynchronous)."""
        moved: dict[str, Any] = {  # every field, of its own type
            name: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for name, value in vars(self).items()
        }
        return PolicyMicroBatch(**moved)

    def flat_temperature(self) -> float | torch.Tensor:
        """The temperature per flattened position: the float, or ``[B * S]``."""
        return self.temperature.reshape(-1) if isinstance(self.temperature, torch.Tensor) else self.temperature

    @overload
    def per_sequence(self, values: torch.Tensor) -> torch.Tensor: ...
    @overload
    def per_sequence(self, values: None) -> None: ...
    def per_sequence(self, values: torch.Tensor | None) -> torch.Tensor | None:
        """``[B, S]`` per-position values -> ``[n, L]`` one sequence per row (0 / False beyond each sequence's
        loss tokens); unchanged when the rows are the sequences (or for ``None`` / per-sequence ``[B]``)."""
        if self.sequences is None or values is None or values.dim() != 2:
            return values
        valid = self.sequences >= 0
        picked = values.reshape(-1)[self.sequences.clamp_min(0)]
        return torch.where(valid, picked, torch.zeros((), dtype=values.dtype, device=values.device))

    def per_position(self, values: torch.Tensor) -> torch.Tensor:
        """``[n, L]`` one sequence per row -> ``[B, S]`` per position (the inverse of :meth:`per_sequence`; 0 at
        positions no sequence's loss token has)."""
        if self.sequences is None:
            return values
        valid = self.sequences >= 0
        out = values.new_zeros(self.mask.numel())
        out[self.sequences[valid]] = values[valid]
        return out.view(self.mask.shape)

    def masks(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(on-policy mask [n, L], guide mask [n, L] or None)``, one sequence per row."""
        mask = self.per_sequence(self.mask)
        if self.guide_rows is None:
            return mask, None
        rows = self.guide_rows.bool()[:, None]
        return mask & ~rows, mask & rows


@dataclass(kw_only=True)
class MiniBatchPlan:
    """Mini-batch-wide constants every micro-batch's loss needs; identical on all ranks of ``dp_cp``."""

    num_microbatches: int
    denominator: torch.Tensor
    """0-dim: the aggregation mode's denominator over every micro-batch and DP x CP rank."""
    total_tokens: torch.Tensor
    """0-dim: valid tokens over every micro-batch and DP x CP rank (on-policy and guide)."""
    guide_denominator: torch.Tensor | None = None
    """0-dim: the aggregation denominator of the guide-policy tokens (``denominator`` then counts the on-policy
    tokens only); ``None`` when the algorithm has no guide term."""
    entropy_stats: EntropyStats | None = None
    """Statistics for ``h_hat`` at ``minibatch`` / ``step`` scope; ``None`` at ``microbatch`` scope."""
    old_is_current: bool = False
    """No forward-only pass: the old log-probs are this forward's own (detached; ratio 1); the micro-batches'
    ``old_log_prob`` carry the rollout's, for the mismatch metrics."""


def check_loss_setup(algo: AlgoConfig, groups: ParallelGroups) -> None:
    """Reject settings the Megatron loss cannot compute exactly, with the reason and the fix."""
    _, cp_size = group_rank_size(groups.cp)
    if cp_size > 1 and AGGREGATION.get(algo.aggregation.kind).whole_sequences:
        raise ValueError(
            f"algo.aggregation.kind={algo.aggregation.kind} needs whole sequences on one rank, but context "
            f"parallelism splits them over {cp_size} ranks: use token-mean / token-sum, or CP = 1"
        )
    if cp_size > 1 and RATIO.get(algo.ratio.kind).whole_sequences:
        raise ValueError(f"algo.ratio.kind={algo.ratio.kind} needs whole sequences on one rank; use CP = 1")


def plan_minibatch(
    microbatches: list[PolicyMicroBatch],
    algo: AlgoConfig,
    groups: ParallelGroups,
    *,
    entropy_stats: EntropyStats | None = None,
    old_is_current: bool = False,
) -> MiniBatchPlan:
    """Count the mini-batch's denominators once (one all-reduce each over ``groups.dp_cp``).

    Every rank of the DP x CP group calls it with its own micro-batches (all pipeline stages may call it; only
    the last one uses the result). ``entropy_stats`` is required when an ``h_hat`` consumer is configured at
    ``minibatch`` / ``step`` scope (see :func:`pooled_entropy_stats`). ``old_is_current``: see
    :attr:`MiniBatchPlan.old_is_current`.
    """
    check_loss_setup(algo, groups)
    scope = algo.entropy.scope
    if needs_entropy(algo) and scope != "microbatch" and entropy_stats is None:
        raise ValueError(f"algo.entropy.scope={scope} needs the pooled statistics: pass entropy_stats=")
    mode = cast("AggregationMode", algo.aggregation.kind)  # validated against AGGREGATION
    split = [mb.masks() for mb in microbatches]
    guide = algo.guide_policy.kind != "none"
    guide_masks = [g if g is not None else torch.zeros_like(m) for m, g in split]
    return MiniBatchPlan(
        num_microbatches=len(microbatches),
        denominator=global_denominator([m for m, _ in split], mode, dp_group=groups.dp_cp),
        total_tokens=global_denominator([mb.mask for mb in microbatches], "token-mean", dp_group=groups.dp_cp),
        entropy_stats=entropy_stats.to(split[0][0].device) if scope != "microbatch" and entropy_stats else None,
        guide_denominator=global_denominator(guide_masks, mode, dp_group=groups.dp_cp) if guide else None,
        old_is_current=old_is_current,
    )


def pooled_entropy_stats(
    entropies: list[torch.Tensor], masks: list[torch.Tensor], algo: AlgoConfig, groups: ParallelGroups
) -> EntropyStats:
    """EntropyStats over all valid tokens of several ``[B, S]`` micro-batches on every DP x CP rank.

    The inputs may live in host memory (the step's batch); the statistics are computed on this rank's device
    (the 32-step pivot search counts over every token once per step) and returned in host memory."""
    device = rank_device()
    flat_entropy = torch.cat([e.reshape(-1) for e in entropies]) if entropies else torch.zeros(0)
    flat_mask = torch.cat([m.reshape(-1) for m in masks]) if masks else torch.zeros(0, dtype=torch.bool)
    cfg = algo.entropy
    stats = distributed_entropy_stats(
        flat_entropy.to(device),
        flat_mask.to(device),
        group=groups.dp_cp,
        pivot_quantile=cfg.pivot_quantile,
        sign=cfg.sign,
    )
    return stats.to("cpu")


@dataclass(frozen=True)
class OutputLayerInputs:
    """What the last stage returns with the fused output layer: the final hidden states and the output weight,
    instead of the logits (Megatron ``GPTModel``'s ``output_processor`` hook)."""

    hidden: torch.Tensor
    """``[S / tp, B, H]`` with sequence parallelism, ``[S, B, H]`` without."""
    weight: torch.Tensor
    """``[V / tp, H]`` this rank's rows of the output (or tied embedding) weight."""
    sequence_parallel: bool


def _output_layer_inputs(
    *, hidden_states: torch.Tensor, output_layer: Any, output_weight: torch.Tensor | None, **_: Any
) -> OutputLayerInputs:
    weight = output_weight if output_weight is not None else output_layer.weight
    return OutputLayerInputs(hidden_states, weight, bool(getattr(output_layer, "sequence_parallel", False)))


def _fused_logprob_entropy(
    batch: PolicyMicroBatch,
    inputs: OutputLayerInputs,
    groups: ParallelGroups,
    chunk_size: int | None,
    vocab_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~megatron_hapo.parallel.fused_output.fused_logprob_entropy` on the masked positions: the
    ``[B * S, V / tp]`` logits never exist."""
    from megatron_hapo.parallel.fused_output import fused_logprob_entropy  # noqa: PLC0415

    hidden = inputs.hidden
    if inputs.sequence_parallel:  # its backward reduce-scatters the hidden gradient over TP
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region  # noqa: PLC0415

        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=groups.tp)
    shape = batch.targets.shape
    hidden = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])  # [B * S, H]
    log_prob, entropy = fused_logprob_entropy(
        hidden,
        inputs.weight,
        batch.targets.reshape(-1),
        tp_group=groups.tp,
        temperature=batch.flat_temperature(),
        chunk_size=chunk_size,
        mask=batch.mask.reshape(-1),
        vocab_size=vocab_size,
        reduce_hidden_grad=not inputs.sequence_parallel,
    )
    return log_prob.reshape(shape), entropy.reshape(shape)


def _logprob_entropy(
    batch: PolicyMicroBatch,
    logits: torch.Tensor | OutputLayerInputs,
    groups: ParallelGroups,
    chunk_size: int | None,
    vocab_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, S, V / tp]`` logits (or the fused output layer's inputs) -> ``(log_prob [B, S], entropy [B, S])``
    float32 (0 outside the mask).

    Columns at or beyond ``vocab_size`` (Megatron's vocabulary padding) are left out of the softmax.
    """
    if isinstance(logits, OutputLayerInputs):
        return _fused_logprob_entropy(batch, logits, groups, chunk_size, vocab_size)
    shape = batch.targets.shape
    if logits.shape[:2] != shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(shape)}: expected [B, S, V/tp]")
    log_prob, entropy = vocab_parallel_logprob_entropy(
        logits.reshape(-1, logits.shape[-1]),
        batch.targets.reshape(-1),
        tp_group=groups.tp,
        temperature=batch.flat_temperature(),
        chunk_size=chunk_size,
        mask=batch.mask.reshape(-1),
        vocab_size=vocab_size,
    )
    return log_prob.reshape(shape), entropy.reshape(shape)


def _run_model(model: Any, batch: PolicyMicroBatch, fused_output: bool = False) -> Any:
    """The model's last-stage output for ``batch``: ``[B, S, V / tp]`` logits, or with ``fused_output`` the
    :class:`OutputLayerInputs` (the output layer then runs inside the loss, without logits)."""
    kwargs: dict[str, Any] = {"output_processor": _output_layer_inputs} if fused_output else {}
    if batch.cu_seqlens is not None:
        from megatron.core.packed_seq_params import PackedSeqParams  # noqa: PLC0415

        kwargs["packed_seq_params"] = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=batch.cu_seqlens,
            cu_seqlens_kv=batch.cu_seqlens,
            max_seqlen_q=batch.max_seqlen,
            max_seqlen_kv=batch.max_seqlen,
        )
    return model(batch.tokens, batch.position_ids, None, **kwargs)


@dataclass(frozen=True)
class LogProbEntropyStep:
    """Forward-only step: per micro-batch ``{"log_prob": [B, S], "entropy": [B, S]}`` on the last stage."""

    groups: ParallelGroups
    vocab_size: int | None
    """The real vocabulary (the model's output is padded beyond it); ``None``: no padded columns."""
    chunk_size: int | None = None
    fused_output: bool = False
    """Compute from the final hidden states and the output weight without logits (``model.fused_output``)."""

    def __call__(self, data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)
        return _run_model(model, batch, self.fused_output), partial(self.loss, batch)

    def loss(self, batch: PolicyMicroBatch, logits: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            log_prob, entropy = _logprob_entropy(batch, logits, self.groups, self.chunk_size, self.vocab_size)
        return log_prob.new_zeros(()), {"log_prob": log_prob, "entropy": entropy}


@dataclass(frozen=True)
class PolicyLossStep:
    """Training step: the configured policy loss of each micro-batch, exact over the whole mini-batch.

    ``calculate_per_token_loss`` must equal the Megatron ``TransformerConfig`` field of the same name.
    """

    algo: AlgoConfig
    groups: ParallelGroups
    plan: MiniBatchPlan
    vocab_size: int | None
    """The real vocabulary (the model's output is padded beyond it); ``None``: no padded columns."""
    calculate_per_token_loss: bool = False
    chunk_size: int | None = None
    fused_output: bool = False
    """Compute from the final hidden states and the output weight without logits (``model.fused_output``)."""

    def __call__(self, data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)
        return _run_model(model, batch, self.fused_output), partial(self.loss, batch)

    def _h_hat(self, batch: PolicyMicroBatch, entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        if not needs_entropy(self.algo):
            return None
        cfg = self.algo.entropy
        stats = self.plan.entropy_stats
        if stats is None:  # micro-batch scope (published code), pooled over the CP pieces of its sequences
            stats = distributed_entropy_stats(
                entropy, mask, group=self.groups.cp, pivot_quantile=cfg.pivot_quantile, sign=cfg.sign
            )
        return normalize_with_stats(entropy, stats)

    def loss(self, batch: PolicyMicroBatch, logits: Any) -> tuple[Any, ...]:
        """Megatron's ``loss_func``: ``(loss, metrics)`` or ``(loss, num_tokens, metrics)`` (per-token path)."""
        if batch.old_log_prob is None or batch.advantages is None:
            raise ValueError("training micro-batches need old_log_prob and advantages")
        log_prob, entropy = _logprob_entropy(batch, logits, self.groups, self.chunk_size, self.vocab_size)
        log_prob, entropy = batch.per_sequence(log_prob), batch.per_sequence(entropy)  # [n, L] from here
        old_log_prob, advantages = batch.per_sequence(batch.old_log_prob), batch.per_sequence(batch.advantages)
        on_mask, guide_mask = batch.masks()
        mismatch = {}
        if self.plan.old_is_current:  # one on-policy step: the old policy is this forward (the pass is skipped)
            mismatch = rollout_mismatch_metrics(log_prob.detach(), old_log_prob, on_mask)  # vs the rollout's
            old_log_prob = log_prob.detach()
        record: dict[str, torch.Tensor] | None = {} if batch.record_values else None
        per_token, metrics = token_policy_loss(
            log_prob,
            old_log_prob,
            advantages,
            on_mask,
            algo=self.algo,
            h_hat=self._h_hat(batch, entropy.detach(), on_mask),
            token_weights=batch.per_sequence(batch.loss_weights),
            record=record,
        )
        terms = [(per_token, on_mask, self.plan.denominator, 1.0)]
        if guide_mask is not None and self.algo.guide_policy.kind != "none":
            if (guide_denominator := self.plan.guide_denominator) is None:
                raise ValueError("guide rows in a mini-batch planned without the guide term: pass the same algo")
            guide_per_token, guide_metrics = self._guide_term(log_prob, old_log_prob, advantages, guide_mask)
            metrics.update(guide_metrics, guide_num_tokens=guide_mask.sum())
            terms.append((guide_per_token, guide_mask, guide_denominator, self.algo.guide_policy.weight))
        mode = cast("AggregationMode", self.algo.aggregation.kind)
        share = torch.stack(  # one or two terms: the same sum as adding them
            [weight * aggregation_terms(pt.detach(), m, mode)[0] / d.clamp_min(1e-12) for pt, m, d, weight in terms]
        ).sum()
        metrics = {name: value.detach() for name, value in {**metrics, **mismatch}.items()}
        metrics["loss_share"] = share  # sums to the mini-batch loss over micro-batches and DP ranks
        metrics["entropy_sum"] = (entropy.detach() * on_mask).sum()
        metrics["num_tokens"] = on_mask.sum()
        if record is not None:  # what this loss used, per position, for the rollout dumps
            record.update(old_log_prob=old_log_prob, entropy=entropy.detach(), mask=on_mask.float())
            names = list(record)
            stacked = torch.stack([batch.per_position(record[name].float()) for name in names]).cpu()  # one copy
            metrics["token_values"] = dict(zip(names, stacked.unbind(), strict=True))  # type: ignore[assignment]
        if self.calculate_per_token_loss:
            loss = sum(
                weight * per_token_loss_outputs(pt, m, mode, denominator=d, total_tokens=self.plan.total_tokens)[0]
                for pt, m, d, weight in terms
            )
            return loss, batch.mask.bool().sum().to(torch.int32), metrics
        _, dp_size = group_rank_size(self.groups.dp)
        loss = sum(
            weight
            * microbatch_loss(pt, m, mode, denominator=d, num_microbatches=self.plan.num_microbatches, dp_size=dp_size)
            for pt, m, d, weight in terms
        )
        return loss, metrics

    def _guide_term(
        self, log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, guide_mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token guide-policy surrogate ``[n, L]`` (ratio ``pi_theta / pi_phi``) and its ``guide_`` metrics."""
        cfg = self.algo.guide_policy
        guide_log_prob = torch.where(guide_mask, old_log_prob, log_prob.detach())  # ratio 1 off the guide rows
        guide = GuideBatch(log_prob=log_prob, guide_log_prob=guide_log_prob, advantages=advantages, mask=guide_mask)
        return GUIDE_POLICY.get(cfg.kind).fn(guide, **GUIDE_POLICY.params(cfg.kind, cfg))


__all__ = [
    "RECORDED_VALUES",
    "LogProbEntropyStep",
    "MiniBatchPlan",
    "ParallelGroups",
    "PolicyLossStep",
    "PolicyMicroBatch",
    "check_loss_setup",
    "check_pipeline_schedule",
    "plan_minibatch",
    "pooled_entropy_stats",
    "stats_from_last_stage",
]
