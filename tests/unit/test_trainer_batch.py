"""Packing responses into next-token micro-batches, and the views between positions and response slots."""

import torch

from megatron_hapo.rollout import Response
from megatron_hapo.trainer.batch import microbatches, pack_rollout, position_view, response_view


def _response(prompt_index: int, tokens: list[int]) -> Response:
    return Response(prompt_index, tokens, torch.tensor([-0.5 * (i + 1) for i in range(len(tokens))]), "stop")


def test_packing_aligns_targets_log_probs_and_views() -> None:
    prompts = [[7, 8, 9], [5]]
    packed = pack_rollout(prompts, [_response(0, [1, 2]), _response(1, [3, 4, 6])], pad_id=0, max_response_length=4)
    assert packed.tokens.tolist() == [[7, 8, 9, 1, 2], [5, 3, 4, 6, 0]]
    assert packed.mask.tolist() == [[False, False, True, True, False], [True, True, True, False, False]]
    assert packed.rollout_log_prob[1, :3].tolist() == [-0.5, -1.0, -1.5]
    (mb,) = microbatches(packed, torch.arange(2), 2)
    assert mb.targets[0, 2:4].tolist() == [1, 2] and mb.targets[1, 0:3].tolist() == [3, 4, 6]  # position t -> t + 1
    left = response_view(packed, packed.rollout_log_prob)
    assert left.tolist() == [[-0.5, -1.0, 0.0, 0.0], [-0.5, -1.0, -1.5, 0.0]]
    assert torch.equal(position_view(packed, left), packed.rollout_log_prob)
    assert position_view(packed, torch.tensor([2.0, 3.0]))[1].tolist() == [3.0, 3.0, 3.0, 0.0, 0.0]


def test_short_last_microbatch_is_filled_with_masked_copies() -> None:
    packed = pack_rollout([[7, 8]], [_response(0, [1, 2, 3])] * 3, pad_id=0, max_response_length=3)
    first, last = microbatches(packed, torch.arange(3), 2)
    assert last.tokens.shape == first.tokens.shape == (2, 5)
    assert last.mask[0].any() and not last.mask[1].any()


def test_a_rank_without_a_share_gets_one_masked_microbatch_of_the_same_shape() -> None:
    """It still runs the schedule, and so joins the gradient reduction and the parameter all-gather."""
    packed = pack_rollout([[7, 8]], [_response(0, [1, 2, 3])] * 3, pad_id=0, max_response_length=3)
    (empty,) = microbatches(packed, torch.zeros(0, dtype=torch.long), 2, old_log_prob=packed.rollout_log_prob)
    (full, _) = microbatches(packed, torch.arange(3), 2)
    assert empty.tokens.shape == full.tokens.shape and not empty.mask.any()


def test_width_rounds_up_to_the_multiple_with_masked_padding() -> None:
    prompts = [[5, 6, 7], [8]]
    responses = [_response(0, [1, 2]), _response(1, [3, 4, 6])]
    plain = pack_rollout(prompts, responses, pad_id=0, max_response_length=4)
    wide = pack_rollout(prompts, responses, pad_id=0, max_response_length=4, width_multiple=16)
    assert plain.tokens.shape == (2, 5) and wide.tokens.shape == (2, 16)
    assert torch.equal(wide.tokens[:, :5], plain.tokens) and not wide.tokens[:, 5:].any()
    assert torch.equal(wide.mask[:, :5], plain.mask) and not wide.mask[:, 5:].any()
    assert torch.equal(wide.response_mask, plain.response_mask)
