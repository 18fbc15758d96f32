"""vocab_parallel_logprob_entropy: one rank against a float64 reference, and TP2 / TP4 over gloo."""

import pytest
import torch
import torch.distributed as dist
from gloo import run_on_ranks

from megatron_hapo.parallel import vocab_parallel_logprob_entropy


def reference(logits, targets, temperature, mask):
    """Full-vocabulary float64 log-prob and entropy (the spec's definition)."""
    log_p = torch.log_softmax(logits.double() / temperature.double().unsqueeze(-1), -1)
    log_prob = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_prob * mask, entropy * mask


def make_case(seed=0, num=29, vocab=96):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num, vocab, generator=gen) * 4
    targets = torch.randint(0, vocab, (num,), generator=gen)
    temperature = torch.rand(num, generator=gen) + 0.5
    mask = torch.rand(num, generator=gen) > 0.25
    grads = torch.randn(2, num, generator=gen)
    return logits, targets, temperature, mask, grads


def check_shard(logits, targets, temperature, mask, grads, shard, group, chunk_size):
    """Forward and backward of one rank's shard against the reference's matching slice."""
    local = logits[:, shard].clone().requires_grad_()
    log_prob, entropy = vocab_parallel_logprob_entropy(
        local,
        targets,
        tp_group=group,
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy_grad=True,
        mask=mask,
    )
    full = logits.double().requires_grad_()
    ref_lp, ref_h = reference(full, targets, temperature, mask)
    torch.testing.assert_close(log_prob.double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_h, atol=1e-5, rtol=0)
    ((log_prob * grads[0]).sum() + (entropy * grads[1]).sum()).backward()
    ((ref_lp * grads[0].double()).sum() + (ref_h * grads[1].double()).sum()).backward()
    torch.testing.assert_close(local.grad.double(), full.grad[:, shard], atol=1e-5, rtol=0)


def test_single_rank_matches_reference_forward_and_backward():
    case = make_case()
    check_shard(*case, shard=slice(None), group=None, chunk_size=7)


def test_entropy_grad_switch_and_bf16_input():
    logits, targets, _, _, _ = make_case(1)
    local = logits.bfloat16().requires_grad_()
    log_prob, entropy = vocab_parallel_logprob_entropy(local, targets, tp_group=None, temperature=1.0)
    assert not entropy.requires_grad and log_prob.requires_grad
    ref_lp, ref_h = reference(local.detach().float(), targets, torch.ones(len(targets)), torch.ones(len(targets)))
    torch.testing.assert_close(log_prob.double(), ref_lp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy.double(), ref_h, atol=1e-4, rtol=1e-4)
    log_prob.sum().backward()
    assert local.grad.dtype == torch.bfloat16


def test_bad_input_is_rejected():
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        vocab_parallel_logprob_entropy(logits, torch.zeros(4, dtype=torch.long), tp_group=None, temperature=0.0)
    with pytest.raises(ValueError, match="need logits"):
        vocab_parallel_logprob_entropy(logits, torch.zeros(3, dtype=torch.long), tp_group=None)


def _rank_body(rank, world):
    case = make_case(seed=3, vocab=24 * world)
    width = case[0].shape[1] // world
    check_shard(*case, shard=slice(rank * width, (rank + 1) * width), group=dist.group.WORLD, chunk_size=5)


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_over_gloo_matches_single_process(world, tmp_path):
    run_on_ranks(_rank_body, world, tmp_path)


def test_out_of_range_targets_and_masked_zero_temperature():
    logits = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"targets must be vocabulary ids in \[0, 8\)"):
        vocab_parallel_logprob_entropy(logits, torch.tensor([0, -100, 3]), tp_group=None)
    mask = torch.tensor([True, False, True])
    log_prob, _ = vocab_parallel_logprob_entropy(
        logits, torch.tensor([0, -100, 3]), tp_group=None, temperature=torch.tensor([1.0, 0.0, 2.0]), mask=mask
    )
    assert log_prob[1] == 0 and bool(torch.isfinite(log_prob).all())


def test_float64_logits_are_computed_in_float64():
    logits, targets, temperature, mask, _ = make_case(2)
    local = logits.double().requires_grad_()
    log_prob, entropy = vocab_parallel_logprob_entropy(
        local, targets, tp_group=None, temperature=temperature, mask=mask, chunk_size=5
    )
    ref_lp, ref_h = reference(logits, targets, temperature, mask)
    assert log_prob.dtype == torch.float64
    torch.testing.assert_close(log_prob, ref_lp, atol=1e-12, rtol=0)
    torch.testing.assert_close(entropy, ref_h, atol=1e-12, rtol=0)


def _padded_body(rank, world, vocab_size=70):
    """Padded vocabulary (96 columns, 70 real): rank 3 of TP4 holds padding only."""
    logits, targets, temperature, mask, grads = make_case(seed=4, vocab=96)
    targets = targets % vocab_size
    width = 96 // world
    shard = slice(rank * width, (rank + 1) * width)
    local = logits[:, shard].double().clone().requires_grad_()
    group = dist.group.WORLD if world > 1 else None
    log_prob, entropy = vocab_parallel_logprob_entropy(
        local,
        targets,
        tp_group=group,
        temperature=temperature,
        chunk_size=6,
        with_entropy_grad=True,
        mask=mask,
        vocab_size=vocab_size,
    )
    full = logits[:, :vocab_size].double().requires_grad_()
    ref_lp, ref_h = reference(full, targets, temperature, mask)
    torch.testing.assert_close(log_prob, ref_lp, atol=1e-12, rtol=0)
    torch.testing.assert_close(entropy, ref_h, atol=1e-12, rtol=0)
    ((log_prob * grads[0]).sum() + (entropy * grads[1]).sum()).backward()
    ((ref_lp * grads[0].double()).sum() + (ref_h * grads[1].double()).sum()).backward()
    expected = torch.cat([full.grad, torch.zeros(len(targets), 96 - vocab_size, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(local.grad, expected[:, shard], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="targets must be vocabulary ids"):
        vocab_parallel_logprob_entropy(local, targets + vocab_size, tp_group=group, vocab_size=vocab_size)


def test_padded_vocabulary_never_leaks_single_rank():
    _padded_body(0, 1)


def test_padded_vocabulary_never_leaks_over_tp4(tmp_path):
    run_on_ranks(_padded_body, 4, tmp_path)
