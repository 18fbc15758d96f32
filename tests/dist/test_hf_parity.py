"""HF checkpoints loaded into Megatron-Core GPTs reproduce transformers' logits at TP1, TP2 and PP2.

Tiny random Llama 3 (llama3 RoPE scaling, untied), Qwen2 (QKV bias, tied) and Qwen3 (QK-norm, head_dim != H/heads)
models are built offline by transformers and saved as safetensors, with an odd vocabulary (250, padded by
Megatron to 256). Each layout loads them tensor by tensor through the mapping table and runs the real
forward-only schedule; the gathered, unpadded logits must match transformers' within 1e-4 (float32).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo import run_on_ranks

VOCAB, SEQ, BATCH = 250, 12, 2
FAMILIES = ("llama", "qwen2", "qwen3")
TOLERANCE = 1e-4


def _hf_model(family: str):
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=64,
        tie_word_embeddings=family == "qwen2",
    )
    if family == "llama":
        common["max_position_embeddings"] = 16384
        common["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        config, model = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif family == "qwen2":
        config, model = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    else:
        config, model = transformers.Qwen3Config(**common, head_dim=32), transformers.Qwen3ForCausalLM
    torch.manual_seed(0)
    hf = model(config).float().eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them so the mapping matters
        for name, param in hf.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return hf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    for family in FAMILIES:
        hf = _hf_model(family)
        hf.save_pretrained(root / family, safe_serialization=True)
        with torch.no_grad():
            torch.save({"tokens": tokens, "logits": hf(tokens).logits}, root / family / "reference.pt")
    return root


def _megatron_logits(spec, model_dir: Path | None, tokens: torch.Tensor, chunks: list | None = None):
    """Full-vocabulary logits ``[B, S, V]`` on the last pipeline stage (``None`` elsewhere).

    Loads ``model_dir``'s HF weights into a new model unless loaded ``chunks`` are given.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_hapo.models import HFCheckpoint, build_gpt, load_hf_weights
    from megatron_hapo.parallel.collectives import gather_vocab_shards

    tp_group = mpu.get_tensor_model_parallel_group()
    if chunks is None:
        chunks = build_gpt(spec)
        tp_rank, tp_size = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
        load_hf_weights(chunks, spec, HFCheckpoint(model_dir).__getitem__, tp_rank=tp_rank, tp_size=tp_size)

    def step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch, torch.arange(SEQ).expand(BATCH, SEQ), None)
        return output, lambda out: (out.sum() * 0, {"logits": gather_vocab_shards(out, tp_group)})

    outputs = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter([tokens]),
        model=chunks,
        num_microbatches=1,
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=True,
    )
    return outputs[0]["logits"][..., : spec.vocab_size] if outputs else None


def _layouts(rank: int, world: int, root: Path, layouts: list[tuple[int, int]], out: Path) -> None:
    from megatron_hapo.models import read_decoder_spec
    from megatron_hapo.parallel import runtime

    errors = {}
    for tp, pp in layouts:
        runtime.initialize_model_parallel(tp, pp)
        for family in FAMILIES:
            reference = torch.load(root / family / "reference.pt", weights_only=True)
            logits = _megatron_logits(read_decoder_spec(root / family), root / family, reference["tokens"])
            err = torch.tensor([-1.0 if logits is None else float((logits - reference["logits"]).abs().max())])
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            errors[f"{family} tp{tp} pp{pp}"] = float(err)
    if rank == 0:
        out.write_text(json.dumps(errors))


@pytest.mark.parametrize(("world", "layouts"), [(1, [(1, 1)]), (2, [(2, 1), (1, 2)])], ids=["tp1", "tp2-pp2"])
def test_megatron_logits_match_transformers(checkpoints: Path, tmp_path: Path, world: int, layouts: list) -> None:
    report = tmp_path / "errors.json"
    run_on_ranks(partial(_layouts, root=checkpoints, layouts=layouts, out=report), world, tmp_path)
    errors = json.loads(report.read_text())
    assert len(errors) == len(FAMILIES) * len(layouts)
    print(f"max |logit difference| vs transformers: {max(errors.values()):.1e}")
    assert all(0 <= e <= TOLERANCE for e in errors.values()), errors


def test_unsupported_configs_name_the_field() -> None:
    from megatron_hapo.models import decoder_spec

    base = _hf_model("llama").config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    with pytest.raises(ValueError, match="architectures"):
        decoder_spec(base | {"architectures": ["MixtralForCausalLM"]})
    with pytest.raises(ValueError, match="hidden_act"):
        decoder_spec(base | {"hidden_act": "gelu"})
    spec = decoder_spec(base)
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible"):
        spec.check_parallel(tp=4)
    assert spec.padded_vocab_size(tp=2) == 256 and spec.rope_scaling_factor == 8.0
