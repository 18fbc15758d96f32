"""HF -> Megatron torch_dist -> HF round trips are bit-exact, across conversion layouts; bad input writes nothing.

A checkpoint converted at TP1 and one converted by a TP2 job both come back as tensors identical to the
originals; a converted checkpoint loaded at TP2 / PP2 reproduces transformers' logits.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from gloo import run_on_ranks
from test_hf_parity import _hf_model, _megatron_logits, checkpoints  # noqa: F401  (the shared fixture)

FAMILIES = ("llama", "qwen2")


def _convert(rank: int, world: int, root: Path, tp: int, pp: int) -> None:
    from megatron_hapo.models.checkpoint import hf_to_mcore
    from megatron_hapo.parallel import runtime

    runtime.initialize_model_parallel(tp, pp)
    for family in FAMILIES:
        hf_to_mcore(root / family, root / f"{family}-mcore-tp{tp}pp{pp}")


def _export(rank: int, world: int, root: Path, layout: str, families: tuple[str, ...] = FAMILIES) -> None:
    from megatron_hapo.models.checkpoint import mcore_to_hf
    from megatron_hapo.parallel import runtime

    runtime.initialize_model_parallel(1, 1)
    for family in families:
        mcore_to_hf(
            root / f"{family}-mcore-{layout}",
            root / f"{family}-back-{layout}",
            max_shard_bytes=100_000,
            read_bytes=40_000,
        )  # many shards, many read groups


def _logits(rank: int, world: int, root: Path, tp: int, pp: int, out: Path) -> None:
    import torch.distributed as dist

    from megatron_hapo.models.checkpoint import load_mcore
    from megatron_hapo.parallel import runtime

    runtime.initialize_model_parallel(tp, pp)
    errors = {}
    for family in FAMILIES:
        reference = torch.load(root / family / "reference.pt", weights_only=True)
        spec, chunks = load_mcore(root / f"{family}-mcore-tp1pp1")
        logits = _megatron_logits(spec, None, reference["tokens"], chunks=chunks)
        err = torch.tensor([-1.0 if logits is None else float((logits - reference["logits"]).abs().max())])
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        errors[family] = float(err)
    if rank == 0:
        out.write_text(json.dumps(errors))


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from megatron_hapo.models import HFCheckpoint

    checkpoint = HFCheckpoint(model_dir)
    return {name: checkpoint[name] for name in checkpoint.names()}


def test_round_trips_are_bit_exact_and_reshard(checkpoints: Path, tmp_path: Path) -> None:  # noqa: F811
    run_on_ranks(partial(_convert, root=checkpoints, tp=1, pp=1), 1, tmp_path / "a")
    run_on_ranks(partial(_convert, root=checkpoints, tp=2, pp=1), 2, tmp_path / "b")
    for layout in ("tp1pp1", "tp2pp1"):
        run_on_ranks(partial(_export, root=checkpoints, layout=layout), 1, tmp_path / f"c{layout}")
        for family in FAMILIES:
            original, back = _tensors(checkpoints / family), _tensors(checkpoints / f"{family}-back-{layout}")
            assert set(back) == set(original), (family, layout, set(back) ^ set(original))
            for name, tensor in original.items():
                assert torch.equal(back[name], tensor), (family, layout, name)
            assert (checkpoints / f"{family}-back-{layout}" / "model.safetensors.index.json").is_file()  # sharded
    for tp, pp in ((2, 1), (1, 2)):  # the TP1 conversion loaded at other layouts (torch_dist reshards)
        report = tmp_path / f"logits-tp{tp}pp{pp}.json"
        run_on_ranks(partial(_logits, root=checkpoints, tp=tp, pp=pp, out=report), 2, tmp_path / f"d{tp}{pp}")
        errors = json.loads(report.read_text())
        assert all(0 <= e <= 1e-4 for e in errors.values()), (tp, pp, errors)


BROKEN = {  # how the checkpoint is broken -> the error that must name it
    "missing": r"lacks tensor model\.layers\.1\.mlp\.down_proj\.weight",
    "extra": r"no rule maps .*model\.layers\.0\.mlp\.surprise\.weight",
    "shape": r"model\.layers\.0\.self_attn\.o_proj\.weight.*does not fit",
}


def _convert_broken(rank: int, world: int, root: Path) -> None:
    from megatron_hapo.models.checkpoint import hf_to_mcore
    from megatron_hapo.parallel import runtime

    runtime.initialize_model_parallel(world, 1)
    for kind, message in BROKEN.items():
        out = root / f"out-{kind}"
        with pytest.raises(ValueError, match=message):
            hf_to_mcore(root / kind, out)
        assert not out.exists() and not any(out.parent.glob(f".{out.name}*")), kind


def test_broken_checkpoints_are_named_and_nothing_is_written(checkpoints: Path, tmp_path: Path) -> None:  # noqa: F811
    from safetensors.torch import save_file

    for kind in BROKEN:
        tensors = _tensors(checkpoints / "llama")
        if kind == "missing":
            del tensors["model.layers.1.mlp.down_proj.weight"]
        elif kind == "extra":
            tensors["model.layers.0.mlp.surprise.weight"] = torch.zeros(2, 2)
        else:
            name = "model.layers.0.self_attn.o_proj.weight"
            tensors[name] = tensors[name][:, :-1].contiguous()
        (tmp_path / kind).mkdir()
        save_file(tensors, str(tmp_path / kind / "model.safetensors"))
        (tmp_path / kind / "config.json").write_text((checkpoints / "llama" / "config.json").read_text())
    run_on_ranks(partial(_convert_broken, root=tmp_path), 2, tmp_path / "r")


def test_tools_convert_export_and_verify(checkpoints: Path, tmp_path: Path, repo_root: Path) -> None:  # noqa: F811
    import subprocess
    import sys

    def tool(name: str, *args: str) -> str:
        cmd = [sys.executable, str(repo_root / "tools" / name), *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result.stdout

    from rl_fixtures import _model_with_tokenizer
    from transformers import AutoTokenizer

    hf, mcore, back = (
        _model_with_tokenizer(checkpoints / "qwen2", tmp_path / "qwen2"),
        tmp_path / "mcore",
        tmp_path / "back",
    )
    (hf / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")  # code is never carried
    assert "wrote" in tool("convert_hf_to_mcore.py", "--hf-dir", str(hf), "--out", str(mcore), "--tp", "2")
    tool("convert_mcore_to_hf.py", "--ckpt", str(mcore), "--out", str(back))
    assert "conversion verified" in tool("verify_conversion.py", "--hf-dir", str(back), "--ckpt", str(mcore))
    # the export carries the tokenizer and generation files and the chat template in both places, nothing else
    carried = {p.name for p in back.iterdir()} - {p.name for p in back.glob("*.safetensors")}
    assert {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= carried
    assert not {"modeling_custom.py", "reference.pt"} & carried, carried
    assert (
        json.loads((back / "tokenizer_config.json").read_text())["chat_template"]
        == (back / "chat_template.jinja").read_text()
    )
    chat = [{"role": "user", "content": "What is 1 + 2 ?"}]
    source, exported = AutoTokenizer.from_pretrained(hf), AutoTokenizer.from_pretrained(back)
    assert exported.apply_chat_template(chat, add_generation_prompt=True) == source.apply_chat_template(
        chat, add_generation_prompt=True
    )
    for name in ("convert_hf_to_mcore.py", "convert_mcore_to_hf.py", "verify_conversion.py"):
        assert "usage" in tool(name, "--help")


def _deep_llama(path: Path) -> None:
    """4 layers (so PP2 x VPP2 has one layer per chunk), vocabulary 300: padded to 384 at TP1 but 512 at TP2."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=64,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(config).float().eval()
    hf.save_pretrained(path, safe_serialization=True)
    tokens = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.save({"tokens": tokens, "logits": hf(tokens).logits}, path / "reference.pt")


def _chunked_logits(chunks: list, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits ``[B, S, V]`` through the (interleaved, if several chunks) schedule, one micro-batch per sample."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_hapo.parallel.collectives import gather_vocab_shards

    seq = tokens.shape[1]

    def step(data_iterator, model):
        sample = next(data_iterator)
        output = model(sample, torch.arange(seq)[None], None)
        return output, lambda out: (
            out.sum() * 0,
            {"logits": gather_vocab_shards(out, mpu.get_tensor_model_parallel_group())},
        )

    samples = list(tokens.split(1))
    iterators = [iter(samples) for _ in chunks] if len(chunks) > 1 else iter(samples)
    outputs = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iterators,
        model=chunks,
        num_microbatches=len(samples),
        seq_length=seq,
        micro_batch_size=1,
        forward_only=True,
    )
    return torch.cat([o["logits"] for o in outputs]) if outputs else None


def _vpp_round(rank: int, world: int, root: Path, out: Path) -> None:
    import torch.distributed as dist

    from megatron_hapo.models.checkpoint import hf_to_mcore, load_mcore
    from megatron_hapo.parallel import runtime

    runtime.initialize_model_parallel(1, 2, 2)
    hf_to_mcore(root / "deep", root / "deep-mcore-vpp")  # saved from four chunks on two stages
    reference = torch.load(root / "deep" / "reference.pt", weights_only=True)
    errors = {}
    for tp, pp, vpp in ((2, 1, None), (1, 2, 2)):
        runtime.initialize_model_parallel(tp, pp, vpp)
        _, chunks = load_mcore(root / "deep-mcore-vpp", batch_p2p_comm=False)
        logits = _chunked_logits(chunks, reference["tokens"])
        err = -1.0 if logits is None else float((logits[..., :300] - reference["logits"]).abs().max())
        err = torch.tensor([err])
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        errors[f"tp{tp} pp{pp} vpp{vpp}"] = float(err)
    if rank == 0:
        out.write_text(json.dumps(errors))


def test_virtual_stage_conversion_reloads_at_other_layouts_and_other_vocab_padding(tmp_path: Path) -> None:
    _deep_llama(tmp_path / "deep")
    report = tmp_path / "errors.json"
    run_on_ranks(partial(_vpp_round, root=tmp_path, out=report), 2, tmp_path / "a")
    errors = json.loads(report.read_text())
    assert len(errors) == 2 and all(0 <= e <= 1e-4 for e in errors.values()), errors
    run_on_ranks(partial(_export, root=tmp_path, layout="vpp", families=("deep",)), 1, tmp_path / "b")
    original, back = _tensors(tmp_path / "deep"), _tensors(tmp_path / "deep-back-vpp")
    assert set(original) == set(back) and all(torch.equal(back[n], t) for n, t in original.items())
