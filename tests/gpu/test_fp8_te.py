"""Megatron GPT with the Transformer Engine spec on CUDA: bf16 parity with the local spec, and an FP8 step."""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def megatron_world(require_te, nccl_megatron_world):
    """Transformer Engine first (a skip must not wait for NCCL), then the one-rank world."""


def _spec():
    from megatron_hapo.models import decoder_spec

    return decoder_spec(
        {
            "architectures": ["Qwen3ForCausalLM"],
            "vocab_size": 1000,
            "hidden_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 32,
            "intermediate_size": 512,
        }
    )


def _forward_backward(chunks, tokens):
    model = chunks[0]  # built on this rank's GPU
    logits = model(tokens, torch.arange(tokens.shape[1], device="cuda").expand_as(tokens), None)
    logits.float().logsumexp(-1).mean().backward()
    return logits


def test_te_spec_matches_local_spec_in_bf16(megatron_world):
    from megatron_hapo.models import build_gpt
    from megatron_hapo.models.mapping import rules, to_hf

    spec = _spec()
    local, te = build_gpt(spec, dtype=torch.bfloat16), build_gpt(spec, dtype=torch.bfloat16, te=True)
    local_params = dict(local[0].named_parameters())
    te_params = dict(te[0].named_parameters())
    with torch.no_grad():  # copy weights local -> TE through the mapping's two name sets
        for local_rule, te_rule in zip(rules(spec), rules(spec, te=True), strict=True):
            te_params[te_rule.megatron].copy_(local_params[local_rule.megatron])
        assert to_hf(rules(spec)[0], [local_params["embedding.word_embeddings.weight"]], spec)
    tokens = torch.randint(0, 1000, (2, 64), device="cuda")
    a, b = _forward_backward(local, tokens), _forward_backward(te, tokens)
    assert (a.float() - b.float()).abs().max() < 0.1


def test_te_build_is_fused_and_accumulates_into_main_grad(megatron_world):
    """With Transformer Engine the build fuses RoPE and SwiGLU (the bf16 parity test above runs them against the
    unfused local spec), and under DDP gradient accumulation where apex's kernel imports: a backward fills the
    float32 main gradients."""
    from megatron_hapo.models import build_gpt
    from megatron_hapo.models.provider import _wgrad_kernel_imports

    chunks = build_gpt(_spec(), dtype=torch.bfloat16, te=True, ddp=True)
    config = chunks[0].config
    assert config.apply_rope_fusion and config.bias_activation_fusion
    assert config.gradient_accumulation_fusion == _wgrad_kernel_imports()
    chunks[0].zero_grad_buffer()
    _forward_backward(chunks, torch.randint(0, 1000, (2, 64), device="cuda"))
    main_grads = [p.main_grad for p in chunks[0].parameters()]
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in main_grads)
    assert sum(float(g.abs().sum()) for g in main_grads) > 0


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_step_runs_and_stays_finite(megatron_world, recipe):
    from megatron_hapo.models import build_gpt
    from megatron_hapo.models.precision import FP8Config

    keep = 0 if recipe == "delayed" else 1
    fp8 = FP8Config(fp8="hybrid", recipe=recipe, bf16_layers_start=keep, bf16_layers_end=keep)
    chunks = build_gpt(_spec(), dtype=torch.bfloat16, te=True, fp8=fp8)
    tokens = torch.randint(0, 1000, (4, 128), device="cuda")
    logits = _forward_backward(chunks, tokens)
    assert torch.isfinite(logits.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in chunks[0].parameters() if p.grad is not None)


def _fp8_tp2_rank(rank: int, world: int, port: int, recipe: str) -> None:
    """TP2 with sequence parallelism and FP8: the trainer's own micro-batches (odd lengths, packed and padded, the
    interleaved schedule's empty fillers) through the forward pass (where TE checks the FP8 dimensions)."""
    import os

    import torch.distributed as dist

    from megatron_hapo.models import build_gpt
    from megatron_hapo.models.precision import FP8Config, token_multiple
    from megatron_hapo.parallel import runtime
    from megatron_hapo.parallel.policy_loss import LogProbEntropyStep, ParallelGroups
    from megatron_hapo.rollout import Response
    from megatron_hapo.trainer.batch import StepBatch
    from megatron_hapo.trainer.microbatch import BatchLayout, microbatches, run_schedule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    runtime.set_cuda_connections(world)
    with runtime.process_group("nccl", rank=rank, world_size=world):
        runtime.initialize_model_parallel(world, 1)
        fp8 = FP8Config(fp8="hybrid", recipe=recipe, bf16_layers_start=0, bf16_layers_end=0)
        chunks = build_gpt(_spec(), dtype=torch.bfloat16, te=True, fp8=fp8, sequence_parallel=True)
        assert chunks[0].config.sequence_parallel
        groups = ParallelGroups.from_megatron()
        gen = torch.Generator().manual_seed(0)
        lengths = [37, 5, 90, 13]  # none a multiple of 16 x TP
        responses = [
            Response(0, torch.randint(3, 999, (n,), generator=gen).tolist(), -torch.rand(n), "stop") for n in lengths
        ]
        batch = StepBatch.from_responses([[4, 5, 6]], responses, max_response_length=max(lengths))
        multiple = token_multiple(recipe, tp=world, sequence_parallel=True)
        for layout in (
            BatchLayout(micro_batch_size=3, count_multiple=4, sequence_multiple=multiple),
            BatchLayout(max_tokens=max(256, multiple), pack=True, count_multiple=4, sequence_multiple=multiple),
        ):
            mbs, _ = microbatches(batch, torch.arange(len(lengths)), layout)
            outputs = run_schedule(LogProbEntropyStep(groups, 1000), mbs, chunks, forward_only=True)
            assert all(torch.isfinite(out["log_prob"]).all() for out in outputs)
        dist.barrier()


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_at_tp2_with_sequence_parallelism(require_te, recipe):
    """The shipped 70B FP8 layout's shape in small: before the padding followed the layout, every micro-batch
    whose length was not a multiple of 16 x TP failed TE's FP8 dimension check."""
    import torch.multiprocessing as mp
    from gpu_helpers import free_port

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (TP2)")
    mp.spawn(_fp8_tp2_rank, args=(2, free_port(), recipe), nprocs=2, join=True)
