"""Shared set-up of the GPU tests: one rank in an NCCL world with Megatron's model-parallel state."""

import os
import socket

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(scope="module")
def nccl_megatron_world():
    """World of one rank on GPU 0 (NCCL), Megatron TP1 / PP1 seeded; torn down after the module."""
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    mpu.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    yield
    mpu.destroy_model_parallel()
    dist.destroy_process_group()
