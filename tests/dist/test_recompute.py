"""`model.recompute=full` (Megatron's full activation recomputation) gives the same gradients as no recomputation,
at TP2 over gloo in float64: the CPU patches must hold inside the recomputed backward too (the causal mask is
built again there, outside the process-wide device mode)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from gloo import run_on_ranks
from test_vllm_rollout import tiny_llama  # noqa: F401  (the shared fixture)


def _grads(hf_dir: Path, rank: int, recompute: bool) -> dict[str, torch.Tensor]:
    from megatron_hapo.models import HFCheckpoint, build_gpt, load_hf_weights, read_decoder_spec

    spec = read_decoder_spec(hf_dir)
    overrides = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    chunks = build_gpt(spec, dtype=torch.float64, **(overrides if recompute else {}))
    load_hf_weights(chunks, spec, HFCheckpoint(hf_dir).__getitem__, tp_rank=rank, tp_size=2)
    model = chunks[0]
    tokens = torch.arange(3, 43).reshape(2, 20)
    logits = model(tokens, torch.arange(20).expand(2, 20), None)
    (logits.double().pow(2).mean() + logits.double()[..., :5].sum()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _ranks(rank: int, world: int, hf_dir: Path, out: Path) -> None:
    from megatron_hapo.parallel import runtime

    runtime.quiet_logs()
    runtime.initialize_model_parallel(2, 1)
    plain, recomputed = _grads(hf_dir, rank, False), _grads(hf_dir, rank, True)
    worst = max(float((plain[n] - recomputed[n]).abs().max() / plain[n].abs().max().clamp_min(1e-30)) for n in plain)
    if rank == 0:
        out.write_text(json.dumps({"worst_relative": worst, "count": len(plain)}))


def test_full_recompute_gives_the_same_gradients(tiny_llama: Path, tmp_path: Path) -> None:  # noqa: F811
    report = tmp_path / "report.json"
    run_on_ranks(partial(_ranks, hf_dir=tiny_llama, out=report), 2, tmp_path / "ranks")
    result = json.loads(report.read_text())
    assert result["count"] > 10 and result["worst_relative"] <= 1e-12, result
