"""Packed sequences in the THD layout through Transformer Engine's attention on CUDA (issue 18).

The trainer's packed micro-batch (``PackedSeqParams`` with ``cu_seqlens``, the pack's padding a sequence of its
own) must give the log-probs, entropies and gradients of one padded row per sequence. Also the local spec's
per-sequence attention (``models.attention``) on CUDA, and the fused output layer. Not run here yet: the GPU
machine lent to this project has no Transformer Engine, so the TE case skips there by name.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu


def _spec():
    from megatron_hapo.models import decoder_spec

    return decoder_spec(
        {
            "architectures": ["Qwen3ForCausalLM"],
            "vocab_size": 1000,
            "hidden_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 32,
            "intermediate_size": 512,
        }
    )


def _batch():
    from megatron_hapo.rollout.engine import Response
    from megatron_hapo.trainer.batch import StepBatch

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (5, 17)]
    responses = [
        Response(i % 2, torch.randint(3, 1000, (n,), generator=gen).tolist(), torch.zeros(n), "stop")
        for i, n in enumerate((40, 3, 77, 12))
    ]
    batch = StepBatch.from_responses(prompts, responses, max_response_length=80)
    batch.advantages = torch.randn(batch.response_mask.shape, generator=gen) * batch.response_mask
    return batch


def _outputs(chunks, layout, fused: bool) -> tuple[torch.Tensor, dict]:
    from megatron_hapo.config import load_config
    from megatron_hapo.parallel.policy_loss import LogProbEntropyStep, ParallelGroups, PolicyLossStep, plan_minibatch
    from megatron_hapo.trainer.microbatch import microbatches, run_schedule

    groups, batch = ParallelGroups.from_megatron(), _batch()
    rows = torch.arange(batch.num_sequences)
    mbs, slots = microbatches(batch, rows, layout)
    outs = run_schedule(LogProbEntropyStep(groups, 1000, fused_output=fused), mbs, chunks, forward_only=True)
    values = torch.zeros(2, *batch.response_mask.shape)
    for out, where in zip(outs, slots, strict=True):
        width = where.index.shape[1]
        values[0, where.rows, :width] = where.read(out["log_prob"].float().cpu())
        values[1, where.rows, :width] = where.read(out["entropy"].float().cpu())
    batch.old_log_prob = values[0].clone()
    algo = load_config("configs/algo/hapo.yaml", ["algo.entropy.scope=microbatch"], warn=False).algo
    chunks[0].zero_grad_buffer()
    mbs, _ = microbatches(batch, rows, layout, train=True)
    step = PolicyLossStep(algo, groups, plan_minibatch(mbs, algo, groups), 1000, fused_output=fused)
    run_schedule(step, mbs, chunks, forward_only=False)
    return values, {n: p.main_grad.float().clone() for n, p in chunks[0].named_parameters()}


@pytest.mark.parametrize("te", [True, False], ids=["transformer-engine", "local"])
def test_packed_rows_equal_padded_rows_on_cuda(nccl_megatron_world, request, te: bool) -> None:
    if te:
        request.getfixturevalue("require_te")
    from megatron_hapo.models import build_gpt
    from megatron_hapo.trainer.microbatch import BatchLayout

    torch.manual_seed(0)
    chunks = build_gpt(_spec(), dtype=torch.float32, te=te, ddp=True)
    padded, padded_grads = _outputs(chunks, BatchLayout(micro_batch_size=1), fused=False)
    for fused in (False, True):
        packed, packed_grads = _outputs(chunks, BatchLayout(max_tokens=256, pack=True), fused=fused)
        assert (packed - padded).abs().max() <= 1e-4 * padded.abs().max(), fused
        for name, grad in padded_grads.items():
            error = (packed_grads[name] - grad).norm() / grad.norm().clamp_min(1e-30)
            assert error <= 1e-4, (name, fused, float(error))
