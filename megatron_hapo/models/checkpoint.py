"""HF safetensors <-> Megatron ``dist_checkpointing`` (torch_dist) conversion, through the mapping table.

Both directions run inside an initialised ``parallel_state`` (one process, or one rank per TP x PP shard of the
conversion job); the torch_dist checkpoint is reshardable, so it loads at any TP / PP layout. Outputs are
written to a temporary sibling directory and renamed into place at the end: a failure leaves no half-written
checkpoint. The Megatron checkpoint keeps the HF ``config.json`` and tokenizer files under ``hf/`` so that the
way back needs nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_hapo.models.hf_config import DecoderSpec, read_decoder_spec
from megatron_hapo.models.hf_io import HFCheckpoint
from megatron_hapo.models.loading import chunk_rules, load_hf_weights, unwrap
from megatron_hapo.models.mapping import to_hf
from megatron_hapo.models.provider import build_gpt

#: Files copied alongside the weights (config and tokenizer), when present.
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")  # fmt: skip


def _staging(out_dir: Path) -> Path:
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or choose another output directory")
    return out_dir.with_name(f".{out_dir.name}.partial")


def _finish(staging: Path, out_dir: Path) -> None:
    """Rank 0 renames the staging directory once every rank is done."""
    dist.barrier()
    if dist.get_rank() == 0:
        staging.rename(out_dir)
    dist.barrier()


def _copy_side_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in HF_SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def config_dtype(model_dir: Path) -> torch.dtype:
    """The checkpoint's own dtype (``dtype`` / ``torch_dtype`` of config.json; bfloat16 when absent)."""
    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _load_everywhere(chunks: list, spec: DecoderSpec, reader: Callable) -> set[str]:
    """Load on every rank; an error on any rank is raised on all of them (no rank is left in a collective)."""
    from megatron.core import parallel_state as mpu  # noqa: PLC0415

    tp_rank, tp_size = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
    used, error = set(), None
    try:
        used = load_hf_weights(chunks, spec, reader, tp_rank=tp_rank, tp_size=tp_size)
    except (ValueError, KeyError) as exc:
        error = str(exc)
    results: list = [None] * dist.get_world_size()
    dist.all_gather_object(results, (used, error))
    if errors := [e for _, e in results if e]:
        raise ValueError(errors[0])
    return set().union(*(u for u, _ in results))


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None,
                progress: Callable[[str], None] | None = None) -> DecoderSpec:  # fmt: skip
    """Convert an HF safetensors directory into a torch_dist checkpoint at ``out_dir`` (collective call).

    ``progress(name)`` is called before each tensor is read. Raises ``ValueError`` naming the tensor for a
    missing, extra or mis-shaped tensor; nothing is written then.
    """
    from megatron.core import dist_checkpointing  # noqa: PLC0415

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    spec, source = read_decoder_spec(hf_dir), HFCheckpoint(hf_dir)
    staging = _staging(out_dir)
    chunks = build_gpt(spec, dtype=dtype or config_dtype(hf_dir), perform_initialization=False)
    reader = source.__getitem__ if progress is None else _reporting(source.__getitem__, progress)
    used = _load_everywhere(chunks, spec, reader)
    tied_head = {"lm_head.weight"} if spec.tie_word_embeddings else set()
    if extra := sorted(set(source.names()) - used - tied_head):
        raise ValueError(f"the checkpoint has tensors no rule maps (unsupported variant?): {extra[:5]}")
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        _copy_side_files(hf_dir, staging / "hf")
    dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(chunks), str(staging))
    _finish(staging, out_dir)
    return spec


def _reporting(reader: Callable[[str], torch.Tensor], progress: Callable[[str], None]) -> Callable:
    """``reader`` that calls ``progress(name)`` before each tensor it reads."""

    def read(name: str) -> torch.Tensor:
        progress(name)
        return reader(name)

    return read


def _sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    if len(chunks) > 1:
        raise NotImplementedError("converting with virtual pipeline stages is not supported; use vpp=None")
    return unwrap(chunks[0]).sharded_state_dict()


def load_mcore(ckpt_dir: str | Path, *, dtype: torch.dtype | None = None) -> tuple[DecoderSpec, list]:
    """Build the model of a converted checkpoint for the current layout and load its weights (collective)."""
    from megatron.core import dist_checkpointing  # noqa: PLC0415

    ckpt_dir = Path(ckpt_dir)
    spec = read_decoder_spec(ckpt_dir / "hf")
    chunks = build_gpt(spec, dtype=dtype or config_dtype(ckpt_dir / "hf"), perform_initialization=False)
    state = dist_checkpointing.load(_sharded_state_dict(chunks), str(ckpt_dir))
    unwrap(chunks[0]).load_state_dict(state, strict=False)  # no rotary / extra-state buffers in the checkpoint
    return spec, chunks


def mcore_to_hf(ckpt_dir: str | Path, out_dir: str | Path, *, max_shard_bytes: int = 5 * 2**30,
                dtype: torch.dtype | None = None) -> None:  # fmt: skip
    """Write a converted checkpoint back as sharded HF safetensors (+ config, tokenizer); single rank, TP1 / PP1."""
    if dist.get_world_size() != 1:
        raise ValueError("mcore_to_hf runs on one rank (the checkpoint is resharded to TP1 / PP1 on load)")
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    staging = _staging(out_dir)
    spec, chunks = load_mcore(ckpt_dir, dtype=dtype)
    shutil.rmtree(staging, ignore_errors=True)
    _copy_side_files(ckpt_dir / "hf", staging)
    params = dict(unwrap(chunks[0]).named_parameters())
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    weight_map: dict[str, str] = {}
    files: list[dict[str, torch.Tensor]] = [shard]
    for name, rule in chunk_rules(chunks[0], spec, te=False).items():
        for hf_name, tensor in to_hf(rule, [params[name].detach()], spec).items():
            if shard and shard_bytes >= max_shard_bytes:
                shard, shard_bytes = {}, 0
                files.append(shard)
            shard[hf_name] = tensor.contiguous()
            shard_bytes += tensor.numel() * tensor.element_size()
    for i, tensors in enumerate(files):
        file = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" if len(files) > 1 else "model.safetensors"
        save_file(tensors, str(staging / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(os.path.getsize(staging / f) for f in set(weight_map.values()))},
                 "weight_map": weight_map}  # fmt: skip
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    _finish(staging, out_dir)
