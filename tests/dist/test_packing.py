"""Token-budget micro-batches and packed sequences compute what one sequence per micro-batch computes.

The trainer's own path (``StepBatch`` -> ``microbatches`` -> ``run_schedule`` with the forward-only step, the pooled
statistics and ``PolicyLossStep``) runs on a float64 tiny GPT three ways: one sequence per micro-batch (the
reference), a token budget with each micro-batch padded to its own longest sequence, and the same budget with the
sequences packed into one THD row (the local attention per sequence, rotary positions restarting at each), and
packed with the fused output layer (log-probs from the hidden states, no logits). Old log-probs, entropies, the loss
and every gradient must agree within relative 1e-6 for every aggregation mode (``seq-mean-*`` count sequences, not
rows), a sequence-level ratio and the mixed-policy guide term, on one rank, at PP2 (shapes exchanged between
stages), at PP2 x VPP2 (one shape per schedule call) and at TP2 with sequence parallelism (the fused layer gathers
the sequence-parallel hidden states itself).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo import run_on_ranks
from tiny_gpt import full_grads

from megatron_hapo.algos import AGGREGATION_MODES

HAPO = Path(__file__).parents[2] / "configs" / "algo" / "hapo.yaml"
VOCAB, NUM_SEQUENCES, MAX_RESPONSE = 128, 9, 40
TOLERANCE = 1e-6
#: (extra overrides, guide rows present)
CASES = [([f"algo.aggregation.kind={mode}"], False) for mode in AGGREGATION_MODES] + [
    (["algo.aggregation.kind=seq-mean-token-mean", "algo.ratio.kind=sequence_geometric"], False),
    (
        ["algo.aggregation.kind=seq-mean-token-mean", "algo.guide_policy.kind=mixed", "algo.guide_policy.weight=0.7"],
        True,
    ),
]


def _step_batch(guide: bool):
    from megatron_hapo.rollout.engine import Response
    from megatron_hapo.trainer.batch import StepBatch

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (int(n),), generator=gen).tolist() for n in (3, 9, 5)]
    lengths = [1, 40, 7, 0, 22, 13, 9, 31, 7]  # long-tailed, one empty response; three of 12 tokens in all
    responses = [
        Response(i % 3, torch.randint(3, VOCAB, (n,), generator=gen).tolist(), -torch.rand(n, generator=gen), "stop")
        for i, n in enumerate(lengths)
    ]
    batch = StepBatch.from_responses(prompts, responses, max_response_length=MAX_RESPONSE)
    batch.advantages = torch.randn(batch.response_mask.shape, generator=gen, dtype=torch.float64).float()
    batch.advantages *= batch.response_mask
    if guide:  # the last two sequences play the guide policy's samples
        batch.guide_rows[-2:] = True
    return batch


def _run(batch, layout, algo, chunks, groups, fused: bool) -> dict:
    from megatron.core import parallel_state as mpu

    from megatron_hapo.parallel.policy_loss import (
        LogProbEntropyStep,
        PolicyLossStep,
        plan_minibatch,
        pooled_entropy_stats,
        stats_from_last_stage,
    )
    from megatron_hapo.trainer.microbatch import microbatches, run_schedule

    rows = torch.arange(batch.num_sequences)
    mbs, slots = microbatches(batch, rows, layout)
    saved = []  # tensors autograd keeps for a backward: the forward-only pass must keep none
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        outputs = run_schedule(LogProbEntropyStep(groups, VOCAB, fused_output=fused), mbs, chunks, forward_only=True)
    graph = [key for out in outputs for key, value in out.items() if value.requires_grad]
    log_prob, entropy = torch.zeros(batch.response_mask.shape), torch.zeros(batch.response_mask.shape)
    for out, where in zip(outputs, slots, strict=False):
        log_prob[where.rows, : where.index.shape[1]] = where.read(out["log_prob"]).float()
        entropy[where.rows, : where.index.shape[1]] = where.read(out["entropy"]).float()
    last = mpu.is_pipeline_last_stage()
    batch.old_log_prob = torch.where(batch.guide_rows[:, None], batch.rollout_log_prob, log_prob + 0.05)
    stats = pooled_entropy_stats([entropy], [batch.on_policy_mask() & last], algo, groups)
    stats = stats_from_last_stage(stats if last else None, groups.pp)
    for chunk in chunks:
        chunk.zero_grad_buffer()
    mbs, _ = microbatches(batch, rows, layout, train=True)
    plan = plan_minibatch(mbs, algo, groups, entropy_stats=stats)
    step = PolicyLossStep(algo, groups, plan, VOCAB, fused_output=fused)
    outputs = run_schedule(step, mbs, chunks, forward_only=False)
    loss = torch.tensor([sum(float(o["loss_share"]) for o in outputs)], dtype=torch.float64)
    dist.all_reduce(loss)
    both = torch.stack([log_prob, entropy]).double()
    dist.all_reduce(both)  # the last stage's values on every rank
    return {
        "log_prob": both[0],
        "entropy": both[1],
        "loss": float(loss),
        "grads": full_grads(chunks),
        "shapes": [tuple(mb.tokens.shape) for mb in mbs],
        "forward_only_saved": len(saved),
        "forward_only_outputs_with_graph": graph,
    }


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


def _layout_rank(rank: int, world: int, tp: int, vpp: int | None, out: Path) -> None:
    from megatron_hapo.config import load_config
    from megatron_hapo.models import TinyGPTShape, build_tiny_gpt
    from megatron_hapo.parallel import runtime
    from megatron_hapo.parallel.policy_loss import ParallelGroups
    from megatron_hapo.trainer.microbatch import BatchLayout

    runtime.quiet_logs()
    runtime.initialize_model_parallel(tp, world // tp, vpp)
    shape = TinyGPTShape(vocab_size=VOCAB, seq_length=64, num_layers=4)
    chunks = build_tiny_gpt(shape, dtype=torch.float64, batch_p2p_comm=vpp is None, seed=0, sequence_parallel=True)
    assert chunks[0].config.sequence_parallel == (tp > 1)
    params = [p for chunk in chunks for p in chunk.parameters()]
    groups, state = ParallelGroups.from_megatron(), [p.detach().clone() for p in params]
    assert chunks[0].config.variable_seq_lengths == (world // tp > 1 and not vpp)
    common = {"count_multiple": world if vpp else 1, "uniform_shape": bool(vpp)}  # as Actor.layout decides
    packed = BatchLayout(max_tokens=96, pack=True, **common)
    layouts = {
        "reference": (BatchLayout(micro_batch_size=1, **common), False),
        "budget": (BatchLayout(max_tokens=96, **common), False),
        "packed": (packed, False),
        "packed+fused": (packed, True),
    }
    report = []
    for overrides, guide in CASES:
        algo = load_config(HAPO, [*overrides, "algo.entropy.scope=step"], warn=False).algo
        results = {}
        for name, (layout, fused) in layouts.items():
            with torch.no_grad():  # this rank's initial shards
                for param, value in zip(params, state, strict=True):
                    param.copy_(value)
            results[name] = _run(_step_batch(guide), layout, algo, chunks, groups, fused)
        ref = results["reference"]
        for name in ("budget", "packed", "packed+fused"):
            got = results[name]
            errors = {key: _relative(got[key], ref[key]) for key in ("log_prob", "entropy")}
            errors["loss"] = abs(got["loss"] - ref["loss"]) / abs(ref["loss"])
            errors["grads"] = max(_relative(got["grads"][n], g) for n, g in ref["grads"].items())
            report.append(
                {
                    "case": overrides,
                    "layout": name,
                    "errors": errors,
                    "microbatches": len(got["shapes"]),
                    "reference_microbatches": len(ref["shapes"]),
                    "shapes": got["shapes"],
                    "forward_only_autograd": (got["forward_only_saved"], got["forward_only_outputs_with_graph"]),
                }
            )
    if rank == 0:
        out.write_text(json.dumps(report))


@pytest.mark.parametrize(
    ("world", "tp", "vpp"),
    [(1, 1, None), (2, 1, None), (2, 1, 2), (2, 2, None)],
    ids=["pp1", "pp2", "pp2-vpp2", "tp2-sp"],
)
def test_budget_and_packing_match_one_sequence_per_microbatch(
    tmp_path: Path, world: int, tp: int, vpp: int | None
) -> None:
    report_file = tmp_path / "report.json"
    run_on_ranks(partial(_layout_rank, tp=tp, vpp=vpp, out=report_file), world, tmp_path)
    report = json.loads(report_file.read_text())
    assert len(report) == 3 * len(CASES)

    for row in report:
        assert max(row["errors"].values()) <= TOLERANCE, row
        assert row["forward_only_autograd"] == [0, []], row  # no activation kept, no graph built
        assert row["microbatches"] < row["reference_microbatches"], row  # the budget really grouped sequences
        if row["layout"].startswith("packed"):
            assert all(rows == 1 for rows, _ in row["shapes"]), row
        if vpp:  # no shape exchange at PP2 x VPP: one shape per schedule call
            assert len(set(map(tuple, row["shapes"]))) == 1, row


def _attention_rank(rank: int, world: int, out: Path) -> None:
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_hapo.models import TinyGPTShape, build_tiny_gpt
    from megatron_hapo.parallel import runtime

    runtime.quiet_logs()
    runtime.initialize_model_parallel(1, 1)
    shape = TinyGPTShape(vocab_size=VOCAB, seq_length=64, num_query_groups=4)  # no GQA: Megatron views k as given
    (chunk,) = build_tiny_gpt(shape, dtype=torch.float64, seed=0)
    core = chunk.module.decoder.layers[0].self_attention.core_attention
    plain = type(core).__mro__[1].forward  # Megatron's DotProductAttention, one sequence at a time
    heads, groups, dim = 4, 4, 16  # 4 heads of 16 (hidden 64)
    lengths = [12, 5, 12, 12, 7, 5]  # equal lengths, not adjacent: batched by length, put back in order
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), n, dim, generator=gen, dtype=torch.float64) for n in (heads, groups, groups))
    for x in (q, k, v):
        x.requires_grad_(True)
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds, max_seqlen_q=12, max_seqlen_kv=12
    )
    packed = core(q, k, v, None, packed_seq_params=params)
    grads = torch.autograd.grad(packed.pow(2).sum(), (q, k, v))
    pieces = [
        plain(core, q[a:b, None], k[a:b, None], v[a:b, None], None, core.attn_mask_type)
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
    ]
    reference = torch.cat(pieces)
    expected = torch.autograd.grad(reference.pow(2).sum(), (q, k, v))
    out.write_text(
        json.dumps(
            {
                "shape": [list(packed.shape), list(reference.shape)],
                "output": float((packed - reference).abs().max()),
                "grads": max(float((a - b).abs().max()) for a, b in zip(grads, expected, strict=True)),
            }
        )
    )


def test_packed_attention_batches_equal_lengths_exactly(tmp_path: Path) -> None:
    """Sequences of one length in a pack run as one batched call (gathered and put back by index): output and
    gradients equal to Megatron's attention run on each sequence alone."""
    report = tmp_path / "report.json"
    run_on_ranks(partial(_attention_rank, out=report), 1, tmp_path)
    result = json.loads(report.read_text())
    assert result["shape"][0] == result["shape"][1], result
    assert result["output"] <= 1e-12 and result["grads"] <= 1e-12, result
