"""The algos on CUDA tensors: same numbers as on CPU, and the asynchronous NaN guard fires.

The NaN guard is a device-side assert (``torch._assert_async``): once it fires, the process's CUDA context is
unusable, so that test runs in a process of its own (in this one it would fail every later GPU test).
"""

import subprocess
import sys

import pytest
import torch

from megatron_hapo.algos import adaptive_temperature, hapo_advantages, normalized_entropy

pytestmark = pytest.mark.gpu


def test_entropy_stats_and_temperature_match_cpu():
    gen = torch.Generator().manual_seed(0)
    entropy = torch.rand(8, 32, generator=gen) * 3
    mask = torch.rand(8, 32, generator=gen) > 0.2
    logits = torch.randn(16, 1000, generator=gen)
    h_cpu, stats_cpu = normalized_entropy(entropy, mask)
    h_gpu, stats_gpu = normalized_entropy(entropy.cuda(), mask.cuda())
    torch.testing.assert_close(h_gpu.cpu(), h_cpu, rtol=1e-5, atol=1e-6)
    t_cpu = adaptive_temperature(logits, 1.0, stats_cpu, tau=0.05)
    t_gpu = adaptive_temperature(logits.cuda().bfloat16(), 1.0, stats_gpu, tau=0.05)
    torch.testing.assert_close(t_gpu.cpu(), t_cpu, rtol=2e-3, atol=2e-3)


def test_group_advantages_match_cpu():
    rewards = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0])
    lengths = torch.tensor([3, 5, 2, 7, 1, 4])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    cpu = hapo_advantages(rewards, lengths, groups, padded_length=8)
    gpu = hapo_advantages(rewards.cuda(), lengths.cuda(), groups.cuda(), padded_length=8)
    torch.testing.assert_close(gpu.cpu(), cpu)


NAN_ENTROPY = """
import torch
from megatron_hapo.algos import normalized_entropy
entropy = torch.ones(2, 4, device="cuda")
entropy[0, 1] = float("nan")
normalized_entropy(entropy, torch.ones_like(entropy, dtype=torch.bool))
torch.cuda.synchronize()
print("NO ASSERT")
"""


def test_nan_entropy_raises_on_cuda(repo_root):
    result = subprocess.run(
        [sys.executable, "-c", NAN_ENTROPY], cwd=repo_root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "NO ASSERT" not in result.stdout, result.stdout + result.stderr[-2000:]
    assert "assert" in result.stderr.lower(), result.stderr[-2000:]
