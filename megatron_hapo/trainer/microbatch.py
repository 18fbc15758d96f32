"""Cut a rank's share of the :class:`~megatron_hapo.trainer.batch.StepBatch` into micro-batches, run Megatron's
schedule over them and put the per-token outputs back.

Three layouts (:class:`BatchLayout`):

- ``micro_batch_size`` sequences per micro-batch, in order (no token budget);
- a token budget ``max_tokens``: sequences are sorted longest first and placed first-fit into micro-batches of
  at most that many tokens as computed (a longer sequence gets one of its own), so similar lengths share a
  micro-batch;
- with ``pack``, the sequences of a micro-batch share one row (the THD layout: ``cu_seqlens``; Transformer
  Engine's attention on a GPU, :mod:`megatron_hapo.models.attention` on CPU), and the budget counts real tokens.

Every row is padded only to its own micro-batch's longest sequence (or the pack's length), rounded up to the
layout's ``sequence_multiple`` (:func:`~megatron_hapo.models.precision.token_multiple`: 16, or what FP8 and
sequence parallelism need, e.g. 128 at TP8 with tensorwise FP8); the filler micro-batches too. Pipeline stages
exchange each micro-batch's shape (Megatron's ``variable_seq_lengths``); all ranks of a pipeline build the same
micro-batches from the same batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from megatron_hapo.models.precision import BASE_TOKEN_MULTIPLE
from megatron_hapo.parallel.policy_loss import PolicyMicroBatch
from megatron_hapo.parallel.runtime import rank_device
from megatron_hapo.trainer.batch import StepBatch

#: Rows are padded to at least a multiple of this (a layout may need more: :attr:`BatchLayout.sequence_multiple`).
SEQUENCE_MULTIPLE = BASE_TOKEN_MULTIPLE


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class BatchLayout:
    """How a rank's sequences become micro-batches."""

    micro_batch_size: int = 4
    """Sequences per micro-batch when there is no token budget."""
    max_tokens: int | None = None
    """Token budget per micro-batch (padding included, unless packed); ``None``: ``micro_batch_size``."""
    pack: bool = False
    """Several sequences in one row (needs ``max_tokens``)."""
    count_multiple: int = 1
    """The number of micro-batches is filled up to a multiple of this with empty ones (the interleaved
    schedule's group size, :attr:`~megatron_hapo.trainer.step.Actor.microbatch_multiple`)."""
    uniform_shape: bool = False
    """Pad every micro-batch of one schedule call to the same ``[B, S]``: pipeline stages that do not exchange
    shapes (:func:`~megatron_hapo.models.provider.variable_shapes`)."""
    sequence_multiple: int = SEQUENCE_MULTIPLE
    """Every row's length is a multiple of this (:func:`~megatron_hapo.models.precision.token_multiple`)."""

    def __post_init__(self) -> None:
        if self.pack and self.max_tokens is None:
            raise ValueError("packing sequences needs a token budget (train.max_tokens_per_microbatch)")
        if self.sequence_multiple < 1 or self.sequence_multiple % SEQUENCE_MULTIPLE:
            raise ValueError(f"sequence_multiple={self.sequence_multiple} must be a multiple of {SEQUENCE_MULTIPLE}")
        if self.max_tokens is not None and self.max_tokens < self.sequence_multiple:
            raise ValueError(
                f"a token budget of {self.max_tokens} is below one padded row ({self.sequence_multiple} tokens for "
                "this layout): raise train.max_tokens_per_microbatch"
            )

    def cost(self, lengths: list[int]) -> int:
        """Tokens a micro-batch of sequences of ``lengths`` computes on (its padded size)."""
        rows, width = microbatch_shape(lengths, pack=self.pack, multiple=self.sequence_multiple)
        return rows * width


def assign_microbatches(lengths: torch.Tensor, layout: BatchLayout) -> list[torch.Tensor]:
    """Split sequences of ``lengths`` (``[R]``) into micro-batches: a list of index tensors into ``[R]``.

    Without a budget, consecutive runs of ``micro_batch_size``. With one, first-fit over the sequences sorted
    longest first (ties by index: the result is the same on every rank). An empty ``lengths`` gives no
    micro-batch."""
    if layout.max_tokens is None:
        return list(torch.arange(len(lengths)).split(layout.micro_batch_size))
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    bin_lengths: list[list[int]] = []
    for i in order:
        length = int(lengths[i])
        for members, sizes in zip(bins, bin_lengths, strict=True):
            if layout.cost([*sizes, length]) <= layout.max_tokens:
                members.append(i)
                sizes.append(length)
                break
        else:
            bins.append([i])
            bin_lengths.append([length])
    return [torch.tensor(sorted(members), dtype=torch.long) for members in bins]


@dataclass
class Slots:
    """Where a micro-batch's sequences sit: what the forward-only outputs are read back from."""

    rows: torch.Tensor
    """``[n]`` the sequences' rows in the step batch."""
    index: torch.Tensor
    """``[n, L_mb]`` int64: the flat ``[B * S]`` position whose output belongs to each response token (-1 beyond
    the response)."""

    def read(self, per_position: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` outputs -> ``[n, L_mb]`` per response token (0 beyond each response)."""
        flat = per_position.reshape(-1)
        return torch.where(self.index >= 0, flat[self.index.clamp_min(0)], 0)


def microbatch_shape(lengths: list[int], *, pack: bool, multiple: int = SEQUENCE_MULTIPLE) -> tuple[int, int]:
    """``(rows, width)`` of the micro-batch of sequences of ``lengths`` (at least one row of ``multiple``; the
    width a multiple of it)."""
    if pack or not lengths:
        return 1, round_up(max(sum(lengths), 1), multiple)
    return len(lengths), round_up(max(lengths), multiple)


def build_microbatch(
    batch: StepBatch,
    rows: torch.Tensor,
    *,
    pack: bool,
    train: bool = False,
    shape: tuple[int, int] | None = None,
    multiple: int = SEQUENCE_MULTIPLE,
) -> tuple[PolicyMicroBatch, Slots]:
    """The micro-batch of ``rows`` (host memory): one padded row per sequence, or one packed row.

    Position ``t`` predicts token ``t + 1``; response token ``j`` of a sequence with prompt length ``p`` is
    predicted at its position ``p - 1 + j``. ``train`` adds the behaviour log-probs, advantages, rollout-correction
    weights and guide flags. Empty ``rows`` give one fully masked row of ``multiple`` pad tokens (the row width's
    multiple). ``shape``: pad to at least this ``(rows, width)`` with masked pad tokens.
    """
    lengths, prompts = batch.lengths[rows], batch.prompt_lengths[rows]
    responses = batch.response_mask[rows]
    count = len(rows)
    pack = pack and count > 0
    num_rows, width = microbatch_shape(lengths.tolist(), pack=pack, multiple=multiple)
    if shape is not None:
        num_rows, width = max(num_rows, shape[0]), max(width, shape[1])
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]]) if pack else torch.arange(count) * width
    tokens = torch.zeros(num_rows * width, dtype=torch.long)
    positions = torch.arange(num_rows * width) % width
    for k in range(count):
        start, length = int(offsets[k]), int(lengths[k])
        source = int(batch.starts[rows[k]])
        tokens[start : start + length] = batch.tokens[source : source + length]
        if pack:
            positions[start : start + length] = torch.arange(length)
    slots_width = max(int(responses.sum(-1).max()) if count else 0, 1)
    slot = torch.arange(slots_width)
    valid = responses[:, :slots_width] if count else torch.zeros(0, slots_width, dtype=torch.bool)
    index = torch.where(valid, offsets[:, None] + prompts[:, None] - 1 + slot, -1)
    mask = torch.zeros(num_rows * width, dtype=torch.bool)
    mask[index[valid]] = True

    def place(values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            return None
        out = torch.zeros(num_rows * width, dtype=values.dtype)
        out[index[valid]] = values[rows][:, :slots_width][valid]
        return out.view(num_rows, width)

    dims = (num_rows, width)
    micro = PolicyMicroBatch(
        tokens=tokens.view(dims),
        position_ids=positions.view(dims),
        targets=torch.roll(tokens.view(dims), -1, dims=1),
        mask=mask.view(dims),
    )
    if pack:
        bounds = torch.cat([offsets, lengths.sum().reshape(1)])
        if width > int(bounds[-1]):  # the pack's padding attends only to itself
            bounds = torch.cat([bounds, torch.tensor([width])])
        micro.cu_seqlens = bounds.to(torch.int32)
        micro.max_seqlen = int(bounds.diff().max())
        micro.sequences = index
    if train:
        micro.old_log_prob, micro.advantages = place(batch.old_log_prob), place(batch.advantages)
        micro.loss_weights = place(batch.weights)
        guide_rows = batch.guide_rows[rows]
        fill = 0 if pack else num_rows - count  # the padding rows are sequences of no tokens
        micro.guide_rows = torch.cat([guide_rows, guide_rows.new_zeros(fill)])
    return micro, Slots(rows, index)


def microbatches(
    batch: StepBatch, rows: torch.Tensor, layout: BatchLayout, *, train: bool = False
) -> tuple[list[PolicyMicroBatch], list[Slots]]:
    """This rank's micro-batches of ``rows`` (its share of a mini-batch, or of the forward-only pass) on its
    device, and where each sequence sits in them.

    Empty ``rows`` give one fully masked micro-batch: a data-parallel rank with no share still runs the
    schedule, so that it joins its collectives (the gradient reduction, and the parameter all-gather an
    overlapped distributed optimizer starts in the next forward). The count is filled up with such empty
    micro-batches to a multiple of ``layout.count_multiple``.

    This is the trainer's one host-to-device boundary: the step's batch lives in host memory, each micro-batch is
    built there and moved to this rank's device (:func:`~megatron_hapo.parallel.runtime.rank_device`).
    """
    groups = [rows[members] for members in assign_microbatches(batch.lengths[rows], layout)] or [rows[:0]]
    groups += [rows[:0]] * (-len(groups) % layout.count_multiple)
    shape = None
    if layout.uniform_shape:
        multiple = layout.sequence_multiple
        shapes = [microbatch_shape(batch.lengths[g].tolist(), pack=layout.pack, multiple=multiple) for g in groups]
        shape = (max(rows for rows, _ in shapes), max(width for _, width in shapes))
    built = [
        build_microbatch(batch, group, pack=layout.pack, train=train, shape=shape, multiple=layout.sequence_multiple)
        for group in groups
    ]
    device = rank_device()
    return [micro.to(device) for micro, _ in built], [slots for _, slots in built]


def run_schedule(forward_step: Any, mbs: list[PolicyMicroBatch], chunks: list[Any], *, forward_only: bool) -> list:
    """Megatron's pipeline schedule over ``mbs`` on the model ``chunks``; returns the last stage's loss outputs.

    The interleaved (virtual-pipeline) schedule runs every micro-batch through each of this rank's model chunks
    and reads chunk ``i``'s micro-batches from data iterator ``i``: one iterator per chunk, each over all of
    ``mbs`` (the micro-batches themselves are shared, not copied). Without virtual stages, one iterator. The
    shapes vary between micro-batches; ``seq_length`` / ``micro_batch_size`` are the largest (Megatron exchanges
    the actual shapes between stages, ``variable_seq_lengths``).

    ``forward_only`` runs under ``torch.no_grad()``: Megatron's schedules do not turn autograd off themselves, so
    every layer would keep its activations for a backward that never comes. (Not inference mode: tensors made
    there, such as cached rotary tables, could not be used by a later training pass.)
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: PLC0415

    iterators = [iter(mbs) for _ in chunks] if len(chunks) > 1 else iter(mbs)
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators,
            model=chunks,
            num_microbatches=len(mbs),
            seq_length=max(mb.tokens.shape[1] for mb in mbs),
            micro_batch_size=max(mb.tokens.shape[0] for mb in mbs),
            forward_only=forward_only,
        )
