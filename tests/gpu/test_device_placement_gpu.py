"""Device discipline on CUDA over NCCL (the CPU side: tests/dist/test_device_placement.py).

The model and its DDP gradient buffer sit on ``cuda:LOCAL_RANK`` (float32 gradients for bf16 parameters), each
micro-batch is moved there at the one boundary, the forward-only pass hands its outputs back to the host, and
every collective helper accepts a host tensor over an NCCL group (it stages the tensor on the GPU).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_model_batches_and_collectives_on_the_rank_device(nccl_megatron_world: None) -> None:
    import torch.distributed as dist

    from megatron_hapo.models import TinyGPTShape, build_tiny_gpt
    from megatron_hapo.parallel import runtime
    from megatron_hapo.parallel.collectives import all_reduce, any_rank, check_same_on_ranks
    from megatron_hapo.rollout.engine import Response
    from megatron_hapo.trainer.batch import StepBatch
    from megatron_hapo.trainer.microbatch import BatchLayout, microbatches

    device = runtime.rank_device()
    assert device.type == "cuda" and runtime.collective_device().type == "cuda"
    (chunk,) = build_tiny_gpt(TinyGPTShape(vocab_size=64, seq_length=32, num_layers=2), dtype=torch.bfloat16)
    assert {p.device for p in chunk.parameters()} == {device}
    assert {b.grad_data.device for b in chunk.buffers} == {device}
    assert {b.grad_data.dtype for b in chunk.buffers} == {torch.float32}
    responses = [Response(prompt_index=0, token_ids=[3, 4, 5], log_probs=torch.zeros(3), finish_reason="stop")]
    step_batch = StepBatch.from_responses([[1, 2]], responses, max_response_length=4)
    (batch,), _ = microbatches(step_batch, torch.arange(1), BatchLayout(max_tokens=32, pack=True), train=True)
    assert {t.device for t in vars(batch).values() if isinstance(t, torch.Tensor)} == {device}
    host = torch.tensor([2.0])
    assert all_reduce(host, dist.ReduceOp.SUM, dist.group.WORLD) is host and host.device.type == "cpu"
    assert runtime.max_over_ranks(0.5) == 0.5 and runtime.broadcast_int(7) == 7 and not any_rank(False)
    check_same_on_ranks("tokens", step_batch.tokens, dist.group.WORLD)
    runtime.barrier()


def _host_tensors_over_nccl(rank: int, world: int, port: int) -> None:
    import os

    import torch.distributed as dist

    from megatron_hapo.parallel import runtime
    from megatron_hapo.parallel.collectives import all_reduce, any_rank, check_same_on_ranks

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    with runtime.process_group():  # a barrier before the group is left
        assert runtime.rank_device() == torch.device("cuda", rank)
        host = torch.tensor([float(rank + 1)])  # a host tensor over NCCL: staged on the GPU, answered on the host
        assert all_reduce(host, dist.ReduceOp.SUM, dist.group.WORLD) is host and host.device.type == "cpu"
        assert float(host) == world * (world + 1) / 2
        assert runtime.max_over_ranks(float(rank)) == world - 1
        assert runtime.max_over_ranks(float("nan") if rank == 0 else 1.0) == float("inf")
        assert runtime.broadcast_int(41 if rank == 0 else 0) == 41 and any_rank(rank == world - 1)
        check_same_on_ranks("tokens", torch.arange(10), dist.group.WORLD)
        assert runtime.all_gather_objects(rank) == list(range(world))


def test_host_tensors_through_the_collective_helpers_over_nccl() -> None:
    import torch.multiprocessing as mp
    from gpu_helpers import free_port

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (NCCL refuses two ranks on one GPU)")
    mp.spawn(_host_tensors_over_nccl, args=(2, free_port()), nprocs=2, join=True)
