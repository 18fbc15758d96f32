"""Checkpoints are data, not code: every pickle a Megatron (torch_dist) checkpoint holds is read through an
allow-list before any loader unpickles it.

A dist checkpoint's ``.metadata`` is a pickle that PyTorch's ``FileSystemReader.read_metadata`` reads with
``pickle.load`` (torch 2.13, ``torch/distributed/checkpoint/filesystem.py``), and each non-tensor item in the
``.distcp`` files is a ``torch.save`` payload that ``DefaultLoadPlanner.load_bytes`` reads with
``torch.load(weights_only=False)``: a crafted checkpoint runs code when loaded, and the SHA-256 manifest only
proves the files are the ones written. :func:`require_data_only` reads ``.metadata`` with an unpickler that
resolves only the classes a checkpoint holds (:data:`ALLOWED`, plus torch's dtypes), then every byte item and a
``common.pt`` with ``torch.load(weights_only=True)`` (torch's own allow-list of tensors and containers), and
raises :class:`UnsafeCheckpointError` naming the file and the class otherwise. Every load path of the project calls
it first: resume, ``model.init_from``, the conversion and verification tools, ``evaluate``.
"""

from __future__ import annotations

import io
import pickle
from functools import cache
from pathlib import Path
from typing import Any

import torch

#: ``(module, name)`` of every class or function a torch_dist ``.metadata`` legitimately refers to (torch 2.13:
#: the metadata dataclasses, the save plan stored with it, the storage index, ``torch.Size`` and layouts).
ALLOWED = frozenset(
    {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("copyreg", "_reconstructor"),
        ("builtins", "object"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        *(
            ("torch.distributed.checkpoint.metadata", name)
            for name in (
                "Metadata",
                "TensorStorageMetadata",
                "ChunkStorageMetadata",
                "BytesStorageMetadata",
                "TensorProperties",
                "MetadataIndex",
                "StorageMeta",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        *(
            ("torch.distributed.checkpoint.planner", name)
            for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "ReadItem", "LoadItemType")
        ),
    }
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that would run code (or cannot be read as data); the message names the file and why."""


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED` and torch's dtypes (``torch.float32`` pickles as a global)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"refers to {module}.{name}, which a checkpoint's metadata never holds")


def _byte_items(ckpt: Path, metadata: Any) -> list[tuple[str, Path, int, int]]:
    """``(item, file, offset, length)`` of every non-tensor item the metadata stores."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata  # noqa: PLC0415

    names = {fqn for fqn, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)}
    return [
        (index.fqn, ckpt / info.relative_path, info.offset, info.length)
        for index, info in (metadata.storage_data or {}).items()
        if index.fqn in names
    ]


def _torch_data(raw: bytes, where: str) -> None:
    try:
        torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:
        reason = str(exc).strip().splitlines()
        raise UnsafeCheckpointError(
            f"{where}: not plain tensors and containers ({reason[0] if reason else exc!r})"
        ) from None


@cache
def _checked(ckpt: Path, stamp: tuple) -> None:
    metadata_file = ckpt / ".metadata"
    try:
        with metadata_file.open("rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{metadata_file}: {exc}; refused, nothing from it was run") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise UnsafeCheckpointError(
            f"{metadata_file}: unreadable checkpoint metadata ({type(exc).__name__}: {exc})"
        ) from None
    for item, path, offset, length in _byte_items(ckpt, metadata):
        if not path.resolve().is_relative_to(ckpt.resolve()) or not path.is_file():
            raise UnsafeCheckpointError(
                f"{metadata_file}: item {item} points at {path}, outside the checkpoint or missing"
            )
        with path.open("rb") as handle:
            handle.seek(offset)
            _torch_data(handle.read(length), f"{path} (item {item})")
    common = ckpt / "common.pt"
    if common.is_file():
        _torch_data(common.read_bytes(), str(common))


def require_data_only(ckpt: str | Path) -> None:
    """Raise :class:`UnsafeCheckpointError` unless every pickle of the checkpoint ``ckpt`` is plain data (see the
    module docstring); checked once per directory state (its files' sizes and modification times)."""
    ckpt = Path(ckpt)
    if not (ckpt / ".metadata").is_file():
        raise UnsafeCheckpointError(f"{ckpt}: not a Megatron checkpoint (.metadata missing)")
    stamp = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in ckpt.iterdir() if p.is_file()))
    _checked(ckpt.resolve(), stamp)
