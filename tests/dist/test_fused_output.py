"""fused_logprob_entropy (no logits materialised): one rank and TP2 / TP4 against a float64 reference."""

import pytest
import torch
import torch.distributed as dist
from gloo import run_on_ranks

from megatron_hapo.parallel.fused_output import fused_logprob_entropy

NUM, HIDDEN, VOCAB = 29, 16, 96


def make_case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(NUM, HIDDEN, generator=gen)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen)
    targets = torch.randint(0, VOCAB, (NUM,), generator=gen)
    temperature = torch.rand(NUM, generator=gen) + 0.5
    mask = torch.rand(NUM, generator=gen) > 0.25
    grads = torch.randn(2, NUM, generator=gen)
    return hidden, weight, targets, temperature, mask, grads


def check_rank(rank, world, group, chunk_size=5):
    hidden, weight, targets, temperature, mask, grads = make_case()
    shard = slice(rank * VOCAB // world, (rank + 1) * VOCAB // world)
    local_h, local_w = hidden.clone().requires_grad_(), weight[shard].clone().requires_grad_()
    log_prob, entropy = fused_logprob_entropy(
        local_h,
        local_w,
        targets,
        tp_group=group,
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy_grad=True,
        mask=mask,
    )
    ref_h, ref_w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    log_p = torch.log_softmax(ref_h @ ref_w.t() / temperature.double().unsqueeze(-1), -1)
    ref_lp = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    ref_ent = -(log_p.exp() * log_p).sum(-1) * mask
    torch.testing.assert_close(log_prob.double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_ent, atol=1e-5, rtol=0)
    ((log_prob * grads[0]).sum() + (entropy * grads[1]).sum()).backward()
    ((ref_lp * grads[0].double()).sum() + (ref_ent * grads[1].double()).sum()).backward()
    torch.testing.assert_close(local_h.grad.double(), ref_h.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(local_w.grad.double(), ref_w.grad[shard], atol=1e-5, rtol=0)
    assert not local_h.grad[~mask].any(), "masked tokens must get no gradient"


def test_single_rank_matches_reference():
    check_rank(0, 1, None)


def test_bf16_inputs_stay_close_and_keep_dtype():
    hidden, weight, targets, *_ = make_case(1)
    h, w = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    log_prob, entropy = fused_logprob_entropy(h, w, targets, tp_group=None)
    (log_prob.sum() + entropy.sum()).backward()
    assert log_prob.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    ref = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert (log_prob.double() - ref).abs().max() < 0.5  # bf16 inputs: only a coarse check


def test_rejects_mismatched_shapes():
    hidden, weight, targets, *_ = make_case()
    with pytest.raises(ValueError, match="hidden"):
        fused_logprob_entropy(hidden, weight[:, :-1], targets, tp_group=None)
    with pytest.raises(ValueError, match="targets must be vocabulary ids"):
        fused_logprob_entropy(hidden, weight, targets + VOCAB, tp_group=None)


def _tp_body(rank, world):
    check_rank(rank, world, dist.group.WORLD)


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_matches_reference(world, tmp_path):
    run_on_ranks(_tp_body, world, tmp_path)


def test_padded_weight_rows_are_excluded():
    hidden, weight, targets, temperature, mask, _ = make_case(3)
    vocab_size = 80
    targets = targets % vocab_size
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    log_prob, entropy = fused_logprob_entropy(
        h,
        w,
        targets,
        tp_group=None,
        temperature=temperature,
        mask=mask,
        vocab_size=vocab_size,
        chunk_size=7,
        with_entropy_grad=True,
    )
    log_p = torch.log_softmax(hidden.double() @ weight[:vocab_size].double().t() / temperature.double()[:, None], -1)
    ref_lp = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    torch.testing.assert_close(log_prob, ref_lp, atol=1e-12, rtol=0)
    (log_prob.sum() + entropy.sum()).backward()
    assert not w.grad[vocab_size:].any() and w.grad[:vocab_size].abs().sum() > 0
