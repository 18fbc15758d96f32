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
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from megatron_hapo.models.hf_config import DecoderSpec, read_decoder_spec
from megatron_hapo.models.hf_io import HFCheckpoint
from megatron_hapo.models.loading import load_hf_weights, unwrap
from megatron_hapo.models.mapping import Rule, rules, to_hf
from megatron_hapo.models.mcore_reader import McoreReader
from megatron_hapo.models.provider import build_gpt
from megatron_hapo.models.safe_checkpoint import require_data_only
from megatron_hapo.parallel import runtime

#: Top-level files of an HF directory that are not carried alongside the weights: the weights themselves and
#: their index (the copy has its own), and code (files users download are data: nothing here runs remote code).
NOT_SIDE_FILES = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx|py|pyc|so)$|\.index\.json$")


def staging_dir(out_dir: Path) -> Path:
    """The sibling ``.NAME.partial`` an output is written into before :func:`publish_staging` (refuses overwrite)."""
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or choose another output directory")
    return out_dir.with_name(f".{out_dir.name}.partial")


def publish_staging(staging: Path, out_dir: Path) -> None:
    """Rank 0 renames the staging directory once every rank is done."""
    runtime.barrier()
    if runtime.rank() == 0:
        staging.rename(out_dir)
    runtime.barrier()


def side_files(src: Path) -> list[Path]:
    """An HF directory's top-level files other than weights and code: config, generation config, tokenizer
    files, chat templates (``chat_template.jinja`` / ``.json``), special tokens map, README and licence."""
    return sorted(p for p in src.iterdir() if p.is_file() and not NOT_SIDE_FILES.search(p.name))


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy :func:`side_files` of ``src`` into ``dst``, the chat template both ways (see :func:`pair_chat_template`)."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in side_files(src):
        shutil.copy2(path, dst / path.name)
    pair_chat_template(dst)


def pair_chat_template(model_dir: Path) -> None:
    """Give ``model_dir`` its chat template in both places transformers has kept it: ``chat_template.jinja``
    (where transformers >= 4.43 saves it) and the ``chat_template`` field of ``tokenizer_config.json`` (where
    older readers, vLLM's included, and tools that read the config alone look). One template only; a config
    with several named templates is left as it is."""
    jinja, config_path = model_dir / "chat_template.jinja", model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    field = config.get("chat_template") if isinstance(config, dict) else None
    if jinja.is_file() and config is not None and field is None:
        config["chat_template"] = jinja.read_text()
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    elif isinstance(field, str) and not jinja.is_file():
        jinja.write_text(field)


def config_dtype(model_dir: Path) -> torch.dtype:
    """The checkpoint's own dtype (``dtype`` / ``torch_dtype`` of config.json; bfloat16 when absent)."""
    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _load_everywhere(chunks: list, spec: DecoderSpec, reader: Callable) -> set[str]:
    """Load on every rank; an error on any rank is raised on all of them (no rank is left in a collective)."""
    layout = runtime.model_parallel_layout()
    tp_rank, tp_size = layout.tp_rank, layout.tp
    used, error = set(), None
    try:
        used = load_hf_weights(chunks, spec, reader, tp_rank=tp_rank, tp_size=tp_size)
    except (ValueError, KeyError) as exc:
        error = str(exc)
    results = runtime.all_gather_objects((used, error))
    if errors := [e for _, e in results if e]:
        raise ValueError(errors[0])
    return set().union(*(u for u, _ in results))


def hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    progress: Callable[[str], None] | None = None,
) -> DecoderSpec:
    """Convert an HF safetensors directory into a torch_dist checkpoint at ``out_dir`` (collective call).

    ``progress(name)`` is called before each tensor is read. Raises ``ValueError`` naming the tensor for a
    missing, extra or mis-shaped tensor; nothing is written then.
    """
    from megatron.core import dist_checkpointing  # noqa: PLC0415

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    spec, source = read_decoder_spec(hf_dir), HFCheckpoint(hf_dir)
    staging = staging_dir(out_dir)
    writer_start = _start_checkpoint_writer()
    try:
        chunks = _load_checked(spec, source, dtype or config_dtype(hf_dir), progress)
    finally:  # a process must not exit while the writer's helper process is half-started (its exit would hang)
        if writer_start is not None:
            writer_start.join()
    if runtime.rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        copy_side_files(hf_dir, staging / "hf")
    runtime.barrier()
    dist_checkpointing.save(chunks_sharded_state_dict(chunks), str(staging))
    publish_staging(staging, out_dir)
    return spec


def _load_checked(
    spec: DecoderSpec, source: HFCheckpoint, dtype: torch.dtype, progress: Callable[[str], None] | None
) -> list[torch.nn.Module]:
    """This rank's chunks with the HF weights loaded; every HF tensor must have been used by some rank."""
    chunks = build_gpt(spec, dtype=dtype, perform_initialization=False)
    reader = source.__getitem__ if progress is None else _reporting(source.__getitem__, progress)
    used = _load_everywhere(chunks, spec, reader)
    tied_head = {"lm_head.weight"} if spec.tie_word_embeddings else set()
    if extra := sorted(set(source.names()) - used - tied_head):
        raise ValueError(f"the checkpoint has tensors no rule maps (unsupported variant?): {extra[:5]}")
    return chunks


def _start_checkpoint_writer() -> threading.Thread | None:
    """Start Megatron's checkpoint-writer helper process in the background, while tensors are read.

    megatron-core 0.19 starts a multiprocessing manager (a spawned interpreter that re-imports the main module,
    about 3 s) on the first torch_dist save of a process; overlapping it with the reading saves that time.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async  # noqa: PLC0415

    start = getattr(filesystem_async, "get_write_results_queue", None)
    if start is None or getattr(filesystem_async, "_results_queue", None) is not None:
        return None
    thread = threading.Thread(target=start, name="megatron-ckpt-writer-start", daemon=True)
    thread.start()
    return thread


def _reporting(reader: Callable[[str], torch.Tensor], progress: Callable[[str], None]) -> Callable:
    """``reader`` that calls ``progress(name)`` before each tensor it reads."""

    def read(name: str) -> torch.Tensor:
        progress(name)
        return reader(name)

    return read


def chunks_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """The chunks' sharded state dicts; with virtual stages one per chunk (keys carry global layer indices)."""
    if len(chunks) == 1:
        return unwrap(chunks[0]).sharded_state_dict()
    return {f"model{i}": unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}


def load_mcore(
    ckpt_dir: str | Path, *, dtype: torch.dtype | None = None, **build_overrides: Any
) -> tuple[DecoderSpec, list]:
    """Build the model of a converted checkpoint for the current layout and load its weights (collective).

    Any TP / PP / VPP layout loads any saved one; ``build_overrides`` go to :func:`build_gpt`.
    """
    from megatron.core import dist_checkpointing  # noqa: PLC0415

    ckpt_dir = Path(ckpt_dir)
    require_data_only(ckpt_dir)  # before any of its pickles is read
    spec = read_decoder_spec(ckpt_dir / "hf")
    chunks = build_gpt(
        spec, dtype=dtype or config_dtype(ckpt_dir / "hf"), perform_initialization=False, **build_overrides
    )
    load_chunks_state(chunks, dist_checkpointing.load(chunks_sharded_state_dict(chunks), str(ckpt_dir)), ckpt_dir)
    return spec, chunks


def load_chunks_state(chunks: list, state: dict, source: Path) -> None:
    """Copy a loaded :func:`chunks_sharded_state_dict` into the chunks; refuse one that lacks a parameter."""
    per_chunk = [state] if len(chunks) == 1 else [state[f"model{i}"] for i in range(len(chunks))]
    for chunk, chunk_state in zip(chunks, per_chunk, strict=True):
        model = unwrap(chunk)
        missing = model.load_state_dict(chunk_state, strict=False).missing_keys  # buffers are not stored
        if lost := sorted(set(missing) & {name for name, _ in model.named_parameters()}):
            raise ValueError(f"{source} does not hold parameters {lost[:5]}; wrong model or checkpoint")


def mcore_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    read_bytes: int = 2**30,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write a converted checkpoint back as sharded HF safetensors (+ config, tokenizer); collective, one rank.

    Streams: layers are read ``read_bytes`` at a time straight from the torch_dist files (no model is built) and
    each safetensors shard is written as soon as it holds ``max_shard_bytes``, so peak memory is about one
    shard plus one read group. ``progress(n)`` is called with the number of HF tensors after each group.
    """
    if runtime.world_size() != 1:
        raise ValueError("mcore_to_hf runs on one rank (it reads full tensors straight from the checkpoint)")
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    staging = staging_dir(out_dir)
    spec = read_decoder_spec(ckpt_dir / "hf")
    reader = McoreReader(ckpt_dir)
    shutil.rmtree(staging, ignore_errors=True)
    copy_side_files(ckpt_dir / "hf", staging)
    writer = _ShardWriter(staging, max_shard_bytes)
    for group in reader.groups(rules(spec, te=True), read_bytes):
        full = reader.read(group)
        for rule in group:
            for hf_name, tensor in _to_hf_checked(rule, full.pop(rule.megatron), spec).items():
                writer.add(hf_name, tensor if dtype is None else tensor.to(dtype))
        if progress is not None:
            progress(sum(len(rule.hf) for rule in group))
    writer.close()
    publish_staging(staging, out_dir)


def _to_hf_checked(rule: Rule, tensor: torch.Tensor, spec: DecoderSpec) -> dict[str, torch.Tensor]:
    try:
        return to_hf(rule, [tensor], spec)
    except RuntimeError as exc:
        raise ValueError(
            f"{rule.megatron}: stored shape {tuple(tensor.shape)} does not fit hf/config.json ({exc})"
        ) from None


class _ShardWriter:
    """Writes HF tensors into numbered safetensors shards as they fill, then names them and writes the index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int) -> None:
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        self.shard: dict[str, torch.Tensor] = {}
        self.shard_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.shard and self.shard_bytes >= self.max_shard_bytes:
            self._flush()
        self.shard[name] = tensor.contiguous()
        self.shard_bytes += tensor.numel() * tensor.element_size()

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self.written):05d}.partial"
        save_file(self.shard, str(path), metadata={"format": "pt"})
        with path.open("rb+") as handle:  # on disk before the directory is renamed into place
            os.fsync(handle.fileno())
        self.written.append((path, list(self.shard)))
        self.shard, self.shard_bytes = {}, 0

    def close(self) -> None:
        if self.shard:
            self._flush()
        count = len(self.written)
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self.written):
            file = f"model-{i + 1:05d}-of-{count:05d}.safetensors" if count > 1 else "model.safetensors"
            path.rename(self.out_dir / file)
            weight_map.update(dict.fromkeys(names, file))
        if count > 1:
            total = sum(os.path.getsize(self.out_dir / f) for f in set(weight_map.values()))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
