"""Turn prompts and rollout responses into the trainer's padded, next-token-aligned micro-batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_hapo.parallel.policy_loss import PolicyMicroBatch
from megatron_hapo.parallel.runtime import rank_device
from megatron_hapo.rollout.engine import Response


@dataclass
class PackedRollout:
    """``N`` prompt + response sequences, right-padded to ``S``; position ``t`` predicts token ``t + 1``."""

    tokens: torch.Tensor
    """``[N, S]`` int64 (``pad_id`` after each sequence)."""
    mask: torch.Tensor
    """``[N, S]`` bool: positions whose next token is a response token."""
    rollout_log_prob: torch.Tensor
    """``[N, S]`` float32 the engine's log-probs of those next tokens (0 elsewhere)."""
    response_mask: torch.Tensor
    """``[N, L]`` bool valid response tokens, left-aligned (for rewards and advantages)."""

    @property
    def num_sequences(self) -> int:
        """``N``."""
        return self.tokens.shape[0]


#: The trainer pads sequence widths to a multiple of this: FP8 GEMMs (Transformer Engine) need token counts in
#: multiples of 8 / 16, and sequence parallelism a multiple of the TP size.
SEQUENCE_MULTIPLE = 16


def pack_rollout(prompts: Sequence[Sequence[int]], responses: Sequence[Response], *, pad_id: int,
                 max_response_length: int, width_multiple: int = 1) -> PackedRollout:  # fmt: skip
    """Pack ``responses`` (each pointing at its prompt by ``prompt_index``) into tensors right-padded to the
    longest sequence, rounded up to ``width_multiple``."""
    seqs = [list(prompts[r.prompt_index]) + r.token_ids for r in responses]
    width = -(-max(len(s) for s in seqs) // width_multiple) * width_multiple
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    rollout_log_prob = torch.zeros(len(seqs), width)
    response_mask = torch.zeros(len(seqs), max_response_length, dtype=torch.bool)
    for i, (seq, response) in enumerate(zip(seqs, responses, strict=True)):
        start, count = len(seq) - len(response.token_ids), len(response.token_ids)
        if count > max_response_length:
            raise ValueError(f"response {i} has {count} tokens, more than max_response_length={max_response_length}")
        tokens[i, : len(seq)] = torch.tensor(seq)
        mask[i, start - 1 : start - 1 + count] = True
        rollout_log_prob[i, start - 1 : start - 1 + count] = response.log_probs
        response_mask[i, :count] = True
    return PackedRollout(tokens, mask, rollout_log_prob, response_mask)


def cat_rows(first: torch.Tensor, second: torch.Tensor, fill: float | int | bool = 0) -> torch.Tensor:
    """``[N1, S1]`` and ``[N2, S2]`` -> ``[N1 + N2, max(S1, S2)]``, each right-padded with ``fill``."""
    width = max(first.shape[1], second.shape[1])
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in (first, second)])


def concat_packed(first: PackedRollout, second: PackedRollout, *, pad_id: int) -> PackedRollout:
    """The sequences of ``first`` then ``second`` in one batch, right-padded to the wider of the two."""
    return PackedRollout(
        tokens=cat_rows(first.tokens, second.tokens, pad_id),
        mask=cat_rows(first.mask, second.mask, False),
        rollout_log_prob=cat_rows(first.rollout_log_prob, second.rollout_log_prob),
        response_mask=torch.cat([first.response_mask, second.response_mask]),
    )


def _response_slots(packed: PackedRollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every response token: its sequence, its ``[S]`` position and its ``[L]`` slot (three ``[T]`` tensors)."""
    rows, positions = packed.mask.nonzero(as_tuple=True)
    slots = (packed.mask.long().cumsum(dim=1) - 1)[rows, positions]
    return rows, positions, slots


def response_view(packed: PackedRollout, per_position: torch.Tensor) -> torch.Tensor:
    """``[N, S]`` values at the response positions of ``packed`` -> ``[N, L]`` left-aligned (0 elsewhere)."""
    rows, positions, slots = _response_slots(packed)
    out = torch.zeros(packed.response_mask.shape, dtype=per_position.dtype)
    out[rows, slots] = per_position[rows, positions]
    return out


def position_view(packed: PackedRollout, per_response: torch.Tensor) -> torch.Tensor:
    """``[N, L]`` left-aligned response values (or ``[N]`` per sequence) -> ``[N, S]`` at the response positions."""
    rows, positions, slots = _response_slots(packed)
    out = torch.zeros(packed.mask.shape, dtype=per_response.dtype)
    out[rows, positions] = per_response[rows] if per_response.dim() == 1 else per_response[rows, slots]
    return out


def microbatches(packed: PackedRollout, rows: torch.Tensor, size: int, *, old_log_prob: torch.Tensor | None = None,
                 advantages: torch.Tensor | None = None,
                 loss_weights: torch.Tensor | None = None, guide_rows: torch.Tensor | None = None,
                 count_multiple: int = 1) -> list[PolicyMicroBatch]:  # fmt: skip
    """Micro-batches of exactly ``size`` sequences from ``rows`` (``[N, S]`` / ``[N]`` extras are sliced alike).

    Pipeline stages exchange activations of one fixed shape, so a short last micro-batch is filled up with
    copies of its last row whose mask is all False: they add nothing to any loss, count or statistic. The
    micro-batch count is filled up the same way to a multiple of ``count_multiple`` (the interleaved schedule's
    group size, :attr:`~megatron_hapo.trainer.step.Actor.microbatch_multiple`).
    Empty ``rows`` give one fully masked micro-batch: a data-parallel rank with no share still runs the
    schedule, so that it joins its collectives (the gradient reduction, and the parameter all-gather an
    overlapped distributed optimizer starts in the next forward).

    This is the trainer's one host-to-device boundary: the step's batch lives in host memory, each
    micro-batch is built there and moved to this rank's device (:func:`~megatron_hapo.parallel.runtime.rank_device`).
    """
    device = rank_device()
    all_masked = not len(rows)
    if all_masked:
        rows = torch.zeros(1, dtype=torch.long)  # any row: its mask is cleared below
    fill = -len(rows) % (size * count_multiple)
    rows = torch.cat([rows, rows[-1:].expand(fill)])
    real = (torch.arange(len(rows)) < len(rows) - fill) & (not all_masked)
    targets = torch.roll(packed.tokens, -1, dims=1)
    width = packed.tokens.shape[1]

    def take(tensor: torch.Tensor | None, chunk: torch.Tensor) -> torch.Tensor | None:
        return None if tensor is None else tensor[chunk]

    out = []
    for chunk, keep in zip(rows.split(size), real.split(size), strict=True):
        out.append(PolicyMicroBatch(
            tokens=packed.tokens[chunk], position_ids=torch.arange(width).expand(len(chunk), -1),
            targets=targets[chunk], mask=packed.mask[chunk] & keep[:, None], old_log_prob=take(old_log_prob, chunk),
            advantages=take(advantages, chunk), loss_weights=take(loss_weights, chunk),
            guide_rows=take(guide_rows, chunk),
        ).to(device))  # fmt: skip
    return out


def run_schedule(forward_step: Any, mbs: list[PolicyMicroBatch], chunks: list[Any], *, forward_only: bool) -> list:
    """Megatron's pipeline schedule over ``mbs`` on the model ``chunks``; returns the last stage's loss outputs.

    The interleaved (virtual-pipeline) schedule runs every micro-batch through each of this rank's model chunks
    and reads chunk ``i``'s micro-batches from data iterator ``i``: one iterator per chunk, each over all of
    ``mbs`` (the micro-batches themselves are shared, not copied). Without virtual stages, one iterator.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: PLC0415

    iterators = [iter(mbs) for _ in chunks] if len(chunks) > 1 else iter(mbs)
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators, model=chunks, num_microbatches=len(mbs),
        seq_length=mbs[0].tokens.shape[1], micro_batch_size=mbs[0].tokens.shape[0], forward_only=forward_only,
    )  # fmt: skip
