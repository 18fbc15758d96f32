"""The step batch, token-budget micro-batches, packing, and the data-parallel split."""

import pytest
import torch

from megatron_hapo.rollout import Response
from megatron_hapo.trainer.batch import StepBatch
from megatron_hapo.trainer.microbatch import BatchLayout, assign_microbatches, build_microbatch, microbatches
from megatron_hapo.trainer.plan import balanced_split


def _response(prompt_index: int, tokens: list[int]) -> Response:
    return Response(prompt_index, tokens, torch.tensor([-0.5 * (i + 1) for i in range(len(tokens))]), "stop")


def _batch() -> StepBatch:
    return StepBatch.from_responses(
        [[7, 8, 9], [5]], [_response(0, [1, 2]), _response(1, [3, 4, 6])], max_response_length=4
    )


def test_step_batch_stores_sequences_back_to_back_and_responses_left_aligned() -> None:
    batch = _batch()
    assert batch.tokens.tolist() == [7, 8, 9, 1, 2, 5, 3, 4, 6]
    assert batch.starts.tolist() == [0, 5, 9] and batch.prompt_lengths.tolist() == [3, 1]
    assert batch.response_mask.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert batch.rollout_log_prob[1, :3].tolist() == [-0.5, -1.0, -1.5]


def test_padded_microbatch_aligns_targets_values_and_reads_back() -> None:
    batch = _batch()
    batch.advantages = torch.tensor([[1.0, 2.0, 0, 0], [3.0, 4.0, 5.0, 0]])
    mb, slots = build_microbatch(batch, torch.arange(2), pack=False, train=True)
    assert mb.tokens.shape == (2, 16) and mb.tokens[0, :5].tolist() == [7, 8, 9, 1, 2]
    assert mb.mask[0, :5].tolist() == [False, False, True, True, False] and not mb.mask[:, 5:].any()
    assert mb.targets[0, 2:4].tolist() == [1, 2] and mb.targets[1, 0:3].tolist() == [3, 4, 6]  # position t -> t + 1
    assert mb.advantages[1, :3].tolist() == [3.0, 4.0, 5.0] and mb.sequences is None
    assert torch.equal(slots.read(mb.advantages), batch.advantages[:, :3])


def test_packed_microbatch_puts_sequences_in_one_row_with_their_own_positions() -> None:
    batch = _batch()
    batch.old_log_prob = batch.rollout_log_prob.clone()
    mb, slots = build_microbatch(batch, torch.arange(2), pack=True, train=True)
    assert mb.tokens.shape == (1, 16) and mb.tokens[0, :9].tolist() == [7, 8, 9, 1, 2, 5, 3, 4, 6]
    assert mb.position_ids[0, :9].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert mb.cu_seqlens.tolist() == [0, 5, 9, 16] and mb.max_seqlen == 7  # the padding is its own sequence
    assert mb.mask[0].nonzero().flatten().tolist() == [2, 3, 5, 6, 7]  # never the boundary between sequences
    # the loss sees one sequence per row, whatever the packing
    assert mb.per_sequence(mb.old_log_prob).tolist() == [[-0.5, -1.0, 0.0], [-0.5, -1.0, -1.5]]
    assert mb.masks()[0].tolist() == [[True, True, False], [True, True, True]]
    assert torch.equal(slots.read(mb.old_log_prob), batch.old_log_prob[:, :3])


def test_token_budget_groups_longest_first_and_never_exceeds_it() -> None:
    lengths = torch.tensor([100, 20, 300, 40, 30, 600, 10])
    padded = BatchLayout(max_tokens=320)
    groups = assign_microbatches(lengths, padded)
    assert sorted(torch.cat(groups).tolist()) == list(range(7))
    for group in groups:  # over budget only alone
        assert padded.cost(lengths[group].tolist()) <= 320 or len(group) == 1
    assert [g.tolist() for g in groups] == [[5], [2], [0, 3], [1, 4, 6]]  # 100 pads to 112: 3 x 112 > 320
    packed = BatchLayout(max_tokens=320, pack=True)
    assert [g.tolist() for g in assign_microbatches(lengths, packed)] == [[5], [1, 2], [0, 3, 4, 6]]


def test_fixed_microbatches_without_a_budget_pad_each_to_its_own_longest() -> None:
    batch = StepBatch.from_responses([[7, 8]], [_response(0, [1] * 30), _response(0, [1])] * 2, max_response_length=30)
    mbs, _ = microbatches(batch, torch.tensor([1, 3, 0, 2]), BatchLayout(micro_batch_size=2))
    assert [tuple(mb.tokens.shape) for mb in mbs] == [(2, 16), (2, 32)]


def test_a_rank_without_a_share_gets_one_masked_microbatch() -> None:
    """It still runs the schedule, and so joins the gradient reduction and the parameter all-gather."""
    (empty,), _ = microbatches(
        _batch(), torch.zeros(0, dtype=torch.long), BatchLayout(max_tokens=64, pack=True), train=True
    )
    assert empty.tokens.shape == (1, 16) and not empty.mask.any()


def test_microbatch_count_fills_up_to_the_interleaved_group() -> None:
    mbs, _ = microbatches(_batch(), torch.arange(2), BatchLayout(micro_batch_size=1, count_multiple=4))
    assert len(mbs) == 4 and mbs[0].mask.any() and not any(mb.mask.any() for mb in mbs[2:])


def test_balanced_split_evens_tokens_and_covers_every_row_once() -> None:
    rows = torch.arange(10, 20)
    lengths = torch.tensor([900, 50, 60, 70, 80, 400, 300, 100, 20, 30])
    shares = balanced_split(rows, lengths, 3)
    assert sorted(torch.cat(shares).tolist()) == rows.tolist()
    loads = [int(lengths[share - 10].sum()) for share in shares]
    assert max(loads) == 900 and min(loads) >= 500  # the 900-token sequence alone; the rest shared evenly
    assert [s.tolist() for s in shares] == [s.sort().values.tolist() for s in shares]


def test_join_appends_guide_rows_with_unit_weights() -> None:
    policy = _batch()
    policy.weights = torch.full((2, 4), 0.5)
    guide = StepBatch.from_responses([[4, 4]], [_response(0, [9])], max_response_length=4, guide=True)
    joined = policy.join(guide)
    assert joined.guide_rows.tolist() == [False, False, True] and joined.starts.tolist() == [0, 5, 9, 12]
    assert joined.weights[2].tolist() == [1.0] * 4 and joined.old_log_prob[2, 0] == -0.5


def test_a_response_longer_than_the_limit_or_without_a_prompt_is_refused() -> None:
    with pytest.raises(ValueError, match="more than max_response_length"):
        StepBatch.from_responses([[1]], [_response(0, [1, 2, 3])], max_response_length=2)
    with pytest.raises(ValueError, match="empty prompt"):
        StepBatch.from_responses([[]], [_response(0, [1])], max_response_length=2)


#: Rows each rank's FP8 GEMM needs its local input in multiples of (Transformer Engine 2.x; None: bf16).
FP8_ROWS = {None: 1, "delayed": 16, "tensorwise": 16, "blockwise": 128, "mxfp8": 32}


def _long_tailed_batch(count: int = 11) -> StepBatch:
    gen = torch.Generator().manual_seed(3)
    lengths = [1, 3, 200, 17, 45, 9, 130, 2, 61, 5, 33][:count]
    prompts = [torch.randint(3, 50, (int(n),), generator=gen).tolist() for n in (4, 9, 6)]
    responses = [_response(i % 3, torch.randint(3, 50, (n,), generator=gen).tolist()) for i, n in enumerate(lengths)]
    return StepBatch.from_responses(prompts, responses, max_response_length=max(lengths))


@pytest.mark.parametrize("recipe", list(FP8_ROWS))
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_every_microbatch_fits_each_ranks_fp8_gemms(recipe: str | None, tp: int) -> None:
    """With sequence parallelism each TP rank's fused norm + linear sees 1 / TP of a micro-batch's tokens; those
    rows must be a multiple of the recipe's (TE's ``assert_dim_for_fp8_exec``) in every micro-batch: padded,
    budgeted, packed, and the empty fillers of the interleaved schedule."""
    from megatron_hapo.models.precision import token_multiple

    multiple = token_multiple(recipe, tp=tp, sequence_parallel=True)
    batch, rows = _long_tailed_batch(), torch.arange(11)
    common = {"count_multiple": 8, "sequence_multiple": multiple}  # fillers up to a multiple of 8 micro-batches
    layouts = {
        "padded": BatchLayout(micro_batch_size=3, **common),
        "budget": BatchLayout(max_tokens=max(512, multiple), **common),
        "packed": BatchLayout(max_tokens=max(512, multiple), pack=True, **common),
        "uniform": BatchLayout(micro_batch_size=2, uniform_shape=True, **common),
    }
    for name, layout in layouts.items():
        for train in (False, True):
            mbs, _ = microbatches(batch, rows, layout, train=train)
            assert len(mbs) % 8 == 0 and not mbs[-1].mask.any(), name  # the last one is a filler
            for mb in mbs:
                sequences, width = mb.tokens.shape
                assert width % tp == 0, (name, recipe, tp, mb.tokens.shape)  # sequence parallelism's split
                local_rows = sequences * width // tp
                assert local_rows % FP8_ROWS[recipe] == 0, (name, recipe, tp, mb.tokens.shape)
    if recipe in ("delayed", "tensorwise") and tp > 1:  # the fixed 16 of before: 16 / TP rows per sequence
        assert 16 * 1 // tp % FP8_ROWS[recipe] != 0 and multiple == 16 * tp


def test_a_budget_below_one_padded_row_is_refused() -> None:
    with pytest.raises(ValueError, match="below one padded row.*128 tokens"):
        BatchLayout(max_tokens=96, sequence_multiple=128)


def test_without_a_budget_every_preset_computes_on_real_tokens() -> None:
    """No preset sets ``train.max_tokens_per_microbatch``: the budget is derived from the rollout lengths
    (``micro_batch_size`` longest sequences) and the sequences are packed, so a long-tailed step computes on at
    most 1.1x its real tokens (padded to each micro-batch's longest, as before: 1.8x on the issue's toy run).
    Except where the loss reads each micro-batch's entropy statistics (HAPO's published micro-batch scope): the
    members of a micro-batch are part of the algorithm there, and stay ``micro_batch_size`` sequences."""
    from pathlib import Path

    from megatron_hapo.config import load_config
    from megatron_hapo.config.run import microbatch_token_budget
    from megatron_hapo.models.plan import microbatch_tokens

    gen = torch.Generator().manual_seed(7)
    lengths = torch.empty(256).log_normal_(5.0, 0.9, generator=gen).clamp(1, 1024).long().tolist()  # long-tailed
    prompts = [torch.randint(3, 50, (int(n),), generator=gen).tolist() for n in (40, 90, 160, 250)]
    responses = [_response(i % 4, [7] * n) for i, n in enumerate(lengths)]
    batch = StepBatch.from_responses(prompts, responses, max_response_length=1024)
    real = int(batch.lengths.sum())
    presets = sorted((Path(__file__).parents[2] / "configs" / "algo").glob("*.yaml"))
    assert len(presets) >= 6
    for preset in presets:
        overrides = ["rollout.max_prompt_length=256", "rollout.max_response_length=1024"]
        overrides += ["algo.reward_shaping.buffer_length=256"]  # DAPO's 4096 exceeds these responses
        config = load_config(preset, overrides, warn=False)
        assert config.train.max_tokens_per_microbatch is None and config.train.pack_sequences, preset.name
        budget = microbatch_token_budget(config)
        assert microbatch_tokens(config) == config.model.micro_batch_size * 1280  # the planner's size either way
        if budget is None:
            assert config.algo.entropy.scope == "microbatch" and preset.stem == "hapo", preset.name
            continue
        assert budget == config.model.micro_batch_size * 1280, preset.name
        mbs, _ = microbatches(batch, torch.arange(batch.num_sequences), BatchLayout(max_tokens=budget, pack=True))
        processed = sum(mb.tokens.numel() for mb in mbs)
        padded = sum(
            mb.tokens.numel() for mb in microbatches(batch, torch.arange(batch.num_sequences), BatchLayout())[0]
        )
        assert processed <= 1.1 * real < padded, (preset.name, processed / real, padded / real)
