"""Megatron (TP / PP / VPP-sharded) -> rollout engine weight sync, and the check that it arrived.

One :class:`SyncPlan` is computed identically on every rank from the model layout (gathered once over the
pipeline group) and the mapping table of :mod:`megatron_hapo.models.mapping`. The plan cuts the model into
units that vLLM can load on their own (one decoder layer, the embedding, the final norm + head: fused groups are
never split) and packs them into buckets of at most ``bucket_bytes``. For each bucket, the owning pipeline stage
gathers its TP shards, converts them to HF tensors and shares them with the other stages; every rank then hands
the bucket to its engine, which cuts its own rollout-TP shard. No rank ever holds more than one bucket of full
tensors beside its own model shard.

:func:`verify_sync` compares the engine's log-probs of a fixed probe sequence with the trainer's own and raises
:class:`WeightSyncError` on every rank when their mean multiplicative error exceeds the tolerance, before any
rollout uses the weights.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_hapo.models.hf_config import DecoderSpec
from megatron_hapo.models.loading import chunk_rules, unwrap, uses_te_spec
from megatron_hapo.models.mapping import to_hf
from megatron_hapo.models.mcore_reader import checkpoint_key, pack_by_bytes
from megatron_hapo.parallel.collectives import any_rank, group_rank_size
from megatron_hapo.parallel.policy_loss import LogProbEntropyStep, ParallelGroups, PolicyMicroBatch
from megatron_hapo.parallel.runtime import max_over_ranks
from megatron_hapo.parallel.weight_transfer import all_gather_objects, gather_shards, share_from_stage
from megatron_hapo.rollout.engine import RolloutEngine

#: Tokens of the sync probe (a multiple of 16: FP8 GEMMs under Transformer Engine need it).
PROBE_TOKENS = 64


class WeightSyncError(RuntimeError):
    """The rollout engine's weights do not reproduce the trainer's model."""


@dataclass(frozen=True)
class SyncUnit:
    """Parameters that vLLM loads together: one layer, the embedding, or the final norm and head."""

    stage: int
    """Pipeline rank that owns them."""
    chunk: int
    """Model chunk (virtual stage) index on that rank."""
    position: int
    """Order in the model: -1 embedding, the global layer index, or ``num_layers`` for the head."""
    params: tuple[str, ...]
    """Local Megatron parameter names in the chunk."""
    nbytes: int
    """Bytes of the full (TP-gathered) tensors."""


@dataclass(frozen=True)
class SyncPlan:
    """Buckets of units, identical on every rank."""

    buckets: tuple[tuple[SyncUnit, ...], ...]
    total_bytes: int


def _position(megatron_name: str, num_layers: int) -> int:
    """-1 for the embedding, the global layer index, or ``num_layers`` for the final norm and head."""
    _, layer = checkpoint_key(megatron_name)
    if layer is not None:
        return layer
    return -1 if megatron_name.startswith("embedding.") else num_layers


def _local_units(chunks: list, spec: DecoderSpec, tp_size: int, stage: int) -> list[tuple]:
    """``(unit, hf names)`` of this rank's chunks (plain tuples: they travel through ``all_gather_object``)."""
    units = []
    for index, chunk in enumerate(chunks):
        params = dict(unwrap(chunk).named_parameters())
        grouped: dict[int, list] = {}
        for name, rule in chunk_rules(chunk, spec, te=uses_te_spec(chunk)).items():
            if name not in params:
                raise ValueError(f"the model has no parameter {name} (spec does not fit the model)")
            position = _position(rule.megatron, spec.num_layers)
            size = params[name].numel() * params[name].element_size() * (tp_size if rule.tp_dim is not None else 1)
            grouped.setdefault(position, []).append((name, rule.hf, size))
        for position, members in grouped.items():
            units.append((stage, index, position, members))
    return units


def build_sync_plan(chunks: list, spec: DecoderSpec, groups: ParallelGroups, *, bucket_bytes: int) -> SyncPlan:
    """The sync plan (collective over the pipeline group; call once per model layout)."""
    stage, _ = group_rank_size(groups.pp)
    _, tp_size = group_rank_size(groups.tp)
    everyone = [
        unit for units in all_gather_objects(_local_units(chunks, spec, tp_size, stage), groups.pp) for unit in units
    ]
    claimed: set[str] = set()
    units = []
    for owner, chunk, position, members in sorted(everyone, key=lambda u: (u[2], u[0], u[1])):
        kept = [(name, size) for name, hf, size in members if not set(hf) <= claimed]  # tied head copy: skip
        for _, hf, _ in members:
            claimed.update(hf)
        if kept:
            units.append(SyncUnit(owner, chunk, position, tuple(n for n, _ in kept), sum(s for _, s in kept)))
    buckets = tuple(tuple(bucket) for bucket in pack_by_bytes(units, lambda unit: unit.nbytes, bucket_bytes))
    return SyncPlan(buckets, sum(u.nbytes for u in units))


def bucket_hf_tensors(
    units: Sequence[SyncUnit], chunks: list, spec: DecoderSpec, tp_group: Any
) -> dict[str, torch.Tensor]:
    """Full HF tensors of this stage's ``units`` (collective over the TP group)."""
    out: dict[str, torch.Tensor] = {}
    tables: dict[int, tuple[dict, dict]] = {}  # per chunk, built once per call
    for unit in units:
        if unit.chunk not in tables:
            chunk = chunks[unit.chunk]
            rules = chunk_rules(chunk, spec, te=uses_te_spec(chunk))
            tables[unit.chunk] = dict(unwrap(chunk).named_parameters()), rules
        params, table = tables[unit.chunk]
        for name in unit.params:
            rule, shard = table[name], params[name].detach()
            shards = gather_shards(shard, tp_group) if rule.tp_dim is not None else [shard]
            out.update(to_hf(rule, shards, spec))
    return out


@dataclass(frozen=True)
class SyncReport:
    """What one sync moved."""

    bytes: int
    seconds: float
    buckets: int


def _plan_tensors(
    chunks: list, spec: DecoderSpec, plan: SyncPlan, groups: ParallelGroups, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """The full HF tensors of the plan, bucket by bucket (collective between items: consume fully, in order)."""
    stage, _ = group_rank_size(groups.pp)
    for bucket in plan.buckets:
        tensors: dict[str, torch.Tensor] = {}
        for owner in sorted({unit.stage for unit in bucket}):
            mine = [unit for unit in bucket if unit.stage == owner]
            produced = bucket_hf_tensors(mine, chunks, spec, groups.tp) if owner == stage else None
            tensors.update(share_from_stage(produced, owner, groups.pp, device))
        yield from tensors.items()
        del tensors  # at most one bucket of full tensors at a time


def sync_weights(
    engine: RolloutEngine, chunks: list, spec: DecoderSpec, plan: SyncPlan, groups: ParallelGroups
) -> SyncReport:
    """Push the trainer's current weights into ``engine`` (collective over the world).

    One ``load_weights`` call takes a lazy stream over every bucket: vLLM runs its layer-wise reload once per
    sync (not once per bucket, which re-walked the whole model and warned for every module a bucket missed),
    while no rank holds more than one bucket of full tensors.
    """
    start = time.perf_counter()
    device = next(unwrap(chunks[0]).parameters()).device
    stream = _plan_tensors(chunks, spec, plan, groups, device)
    error: BaseException | None = None
    try:
        engine.load_weights(stream)
    except Exception as exc:  # raised below on every rank, after the collectives are done
        error = exc
    finally:  # the stream's collectives must run to the end on every rank, whatever this engine did
        leftover = sum(1 for _ in stream)
    if any_rank(error is not None or leftover > 0):
        detail = f"{type(error).__name__}: {error}" if error else f"{leftover} tensors left unread" if leftover else ""
        raise WeightSyncError(
            f"the weight sync failed on at least one rank{f' (here: {detail})' if detail else ''}; "
            "no rollout was run with the engine's weights"
        ) from error
    return SyncReport(plan.total_bytes, time.perf_counter() - start, len(plan.buckets))


def trainer_log_probs(
    chunks: list, token_ids: Sequence[int], groups: ParallelGroups, vocab_size: int | None
) -> torch.Tensor:
    """``[S - 1]`` float32 log-probs of ``token_ids[1:]`` under the Megatron model, on every rank (collective).

    ``vocab_size``: the real vocabulary (Megatron's padded output columns are left out).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: PLC0415

    tokens = torch.tensor([list(token_ids)], device=next(unwrap(chunks[0]).parameters()).device)
    seq = tokens.shape[1]
    targets = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, -1] = False
    batch = PolicyMicroBatch(
        tokens=tokens, position_ids=torch.arange(seq, device=tokens.device)[None], targets=targets, mask=mask
    )
    stage, stages = group_rank_size(groups.pp)
    copies = stages if len(chunks) > 1 else 1  # the interleaved schedule wants at least PP micro-batches
    iterators = [iter([batch] * copies) for _ in chunks] if len(chunks) > 1 else iter([batch])
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=LogProbEntropyStep(groups, vocab_size),
            data_iterator=iterators,
            model=chunks,
            num_microbatches=copies,
            seq_length=seq,
            micro_batch_size=1,
            forward_only=True,
        )
    produced = {"log_prob": outputs[0]["log_prob"][0, :-1].float().contiguous()} if stage == stages - 1 else None
    return share_from_stage(produced, stages - 1, groups.pp, tokens.device)["log_prob"].cpu()


def sync_probe(prompts: Sequence[Sequence[int]], length: int = PROBE_TOKENS) -> list[int]:
    """A fixed probe of exactly ``length`` tokens (a multiple of 16, as FP8 GEMMs need) from the first prompts,
    cycled when they are shorter."""
    if length % 16 or length <= 0:
        raise ValueError(f"probe length must be a positive multiple of 16, got {length}")
    # the first ``length`` tokens only: the caller may pass a whole training set
    tokens = [int(t) for t in itertools.islice((t for prompt in prompts for t in prompt), length)]
    if not tokens:
        raise ValueError("no prompt tokens to build the weight-sync probe from")
    return [tokens[i % len(tokens)] for i in range(length)]


def probe_error(served: torch.Tensor, trainer: torch.Tensor) -> dict[str, float]:
    """How far the engine's probe log-probs ``[P]`` are from the trainer's ``[P]``.

    ``mult_error``: the mean multiplicative probability error ``mean(exp(|served - trainer|)) - 1`` (NeMo-RL's
    ``token_mult_prob_error``, less one), robust to a single token that bf16 / FP8 kernels round far while any
    wrong or missing layer moves every token; ``max_abs``: the largest absolute log-prob difference (reported).
    """
    diff = (served.double() - trainer.double()).abs()
    return {"mult_error": float(diff.exp().mean() - 1), "max_abs": float(diff.max())}


def verify_sync(
    engine: RolloutEngine,
    chunks: list,
    groups: ParallelGroups,
    probe: Sequence[int],
    *,
    vocab_size: int | None,
    tolerance: float,
) -> dict[str, float]:
    """The engine's probe error (:func:`probe_error`), worst over all ranks; raises ``WeightSyncError`` on every
    rank when its ``mult_error`` exceeds ``tolerance`` (or is not finite)."""
    trainer = trainer_log_probs(chunks, probe, groups, vocab_size)
    served = engine.prompt_log_probs(probe)
    error = {name: max_over_ranks(value) for name, value in probe_error(served, trainer).items()}
    if not error["mult_error"] <= tolerance:  # NaN fails too
        raise WeightSyncError(
            f"after the weight sync the rollout engine's probe log-probs differ from the trainer's by a mean "
            f"multiplicative error of {error['mult_error']:.3g} (max |diff| {error['max_abs']:.3g}; tolerance "
            f"{tolerance:g}): wrong or missing weights reached the engine; no rollout was run with them"
        )
    return error
