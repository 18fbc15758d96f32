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
    from megatron_hapo.parallel import megatron_cpu

    megatron_cpu.initialize_model_parallel(tp, pp)
    for family in FAMILIES:
        hf_to_mcore(root / family, root / f"{family}-mcore-tp{tp}pp{pp}")


def _export(rank: int, world: int, root: Path, layout: str) -> None:
    from megatron_hapo.models.checkpoint import mcore_to_hf
    from megatron_hapo.parallel import megatron_cpu

    megatron_cpu.initialize_model_parallel(1, 1)
    for family in FAMILIES:
        mcore_to_hf(root / f"{family}-mcore-{layout}", root / f"{family}-back-{layout}", max_shard_bytes=100_000)


def _logits(rank: int, world: int, root: Path, tp: int, pp: int, out: Path) -> None:
    import torch.distributed as dist

    from megatron_hapo.models.checkpoint import load_mcore
    from megatron_hapo.parallel import megatron_cpu

    megatron_cpu.initialize_model_parallel(tp, pp)
    errors = {}
    for family in FAMILIES:
        reference = torch.load(root / family / "reference.pt")
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


def test_round_trips_are_bit_exact_and_reshard(checkpoints: Path, tmp_path: Path) -> None:
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


def _convert_broken(rank: int, world: int, broken: Path, out: Path) -> None:
    from megatron_hapo.models.checkpoint import hf_to_mcore
    from megatron_hapo.parallel import megatron_cpu

    megatron_cpu.initialize_model_parallel(world, 1)
    with pytest.raises(ValueError, match=r"lacks tensor model\.layers\.1\.mlp\.down_proj\.weight"):
        hf_to_mcore(broken, out)
    assert not out.exists() and not any(out.parent.glob(f".{out.name}*"))


def test_missing_tensor_is_named_and_nothing_is_written(checkpoints: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = _tensors(checkpoints / "llama")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    (broken / "config.json").write_text((checkpoints / "llama" / "config.json").read_text())
    run_on_ranks(partial(_convert_broken, broken=broken, out=tmp_path / "out"), 2, tmp_path / "r")


def test_tools_convert_export_and_verify(checkpoints: Path, tmp_path: Path, repo_root: Path) -> None:
    import subprocess
    import sys

    def tool(name: str, *args: str) -> str:
        cmd = [sys.executable, str(repo_root / "tools" / name), *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result.stdout

    hf, mcore, back = checkpoints / "qwen2", tmp_path / "mcore", tmp_path / "back"
    assert "wrote" in tool("convert_hf_to_mcore.py", "--hf-dir", str(hf), "--out", str(mcore), "--tp", "2")
    tool("convert_mcore_to_hf.py", "--ckpt", str(mcore), "--out", str(back))
    assert "conversion verified" in tool("verify_conversion.py", "--hf-dir", str(back), "--ckpt", str(mcore))
    for name in ("convert_hf_to_mcore.py", "convert_mcore_to_hf.py", "verify_conversion.py"):
        assert "usage" in tool(name, "--help")
