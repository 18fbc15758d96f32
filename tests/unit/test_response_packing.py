"""Responses travel between engine replicas as four flat tensors (rollout/divided.py): nothing is lost."""

import torch

from megatron_hapo.rollout.divided import PACKED_DTYPES, pack_responses, unpack_responses
from megatron_hapo.rollout.engine import Response


def test_responses_survive_packing_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    responses = [
        Response(3, [5, 6, 7], -torch.rand(3, generator=gen), "stop", torch.rand(3, generator=gen) + 0.5),
        Response(3, [], torch.zeros(0), "length"),  # an empty response, no temperatures
        Response(9, [2**31 - 1, 0], -torch.rand(2, generator=gen), "length"),
        Response(12, [11], -torch.rand(1, generator=gen), "stop", torch.tensor([0.7])),
    ]
    packed = pack_responses(responses)
    assert [t.dtype for t in packed] == PACKED_DTYPES
    assert [t.numel() for t in packed] == [16, 6, 6, 4]  # 4 per response; tokens; log-probs; 3 + 1 temperatures
    # as the bytes a broadcast carries: one uint8 buffer, split and viewed back
    buffer = torch.cat([t.contiguous().view(torch.uint8) for t in packed])
    sizes = [t.numel() * t.element_size() for t in packed]
    back = unpack_responses([p.clone().view(d) for p, d in zip(buffer.split(sizes), PACKED_DTYPES, strict=True)])
    assert len(back) == len(responses)
    for got, want in zip(back, responses, strict=True):
        assert (got.prompt_index, got.token_ids, got.finish_reason) == (
            want.prompt_index,
            want.token_ids,
            want.finish_reason,
        )
        assert torch.equal(got.log_probs, want.log_probs)
        assert (got.temperatures is None) == (want.temperatures is None)
        if want.temperatures is not None:
            assert torch.equal(got.temperatures, want.temperatures)
    assert unpack_responses(pack_responses([])) == []
