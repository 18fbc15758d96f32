"""The vocabulary-parallel kernels on CUDA over NCCL: values, gradients, peak memory; TP>1 when GPUs allow."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_hapo.parallel import vocab_parallel_logprob_entropy
from megatron_hapo.parallel.fused_output import fused_logprob_entropy

pytestmark = pytest.mark.gpu


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reference(logits, targets):
    log_p = torch.log_softmax(logits.double(), -1)
    return log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def _check_tp(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(0)
        logits = (torch.randn(512, 4096, generator=gen) * 3).cuda()
        targets = torch.randint(0, 4096, (512,), generator=gen).cuda()
        shard = logits.chunk(world, dim=-1)[rank].clone().requires_grad_()
        log_prob, entropy = vocab_parallel_logprob_entropy(
            shard, targets, tp_group=dist.group.WORLD, chunk_size=100, with_entropy_grad=True
        )
        ref_lp, ref_h = _reference(logits, targets)
        torch.testing.assert_close(log_prob.double(), ref_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy.double(), ref_h, atol=1e-5, rtol=0)
        (log_prob.sum() + entropy.sum()).backward()
        assert torch.isfinite(shard.grad).all()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_vocab_parallel_over_nccl(world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    mp.spawn(_check_tp, args=(world, _free_port()), nprocs=world, join=True)


def test_peak_memory_stays_a_fraction_of_fp32_logits():
    """bf16 logits [4096, 151936]: extra peak beyond logits + their gradient <= 0.25 of fp32 logits."""
    tokens, vocab = 4096, 151_936
    logits = (torch.randn(tokens, vocab, device="cuda") * 3).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    log_prob, entropy = vocab_parallel_logprob_entropy(logits, targets, tp_group=None, with_entropy_grad=True)
    (log_prob.sum() + entropy.sum()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - logits.grad.numel() * logits.grad.element_size()
    assert extra <= 0.25 * tokens * vocab * 4, f"extra peak {extra / 2**20:.0f} MiB"


def test_fused_matches_unfused_on_cuda():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(300, 256, generator=gen).cuda().requires_grad_()
    weight = (torch.randn(5000, 256, generator=gen) / 16).cuda().requires_grad_()
    targets = torch.randint(0, 5000, (300,), generator=gen).cuda()
    log_prob, entropy = fused_logprob_entropy(hidden, weight, targets, tp_group=None, chunk_size=64)
    ref_lp, ref_h = _reference(hidden.double() @ weight.double().t(), targets)
    torch.testing.assert_close(log_prob.double(), ref_lp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_h, atol=1e-4, rtol=1e-5)
    log_prob.sum().backward()
    assert torch.isfinite(weight.grad).all() and torch.isfinite(hidden.grad).all()
