"""Checkpoint manifests: every file of a checkpoint with its size and SHA-256, written last and checked on load.

Hashing is split over the ranks (file ``i`` of the sorted listing is hashed by rank ``i % world``), so a large
checkpoint costs each rank its share of the bytes, not the whole. The manifest is written by rank 0 into the
staging directory before it is renamed into place; a checkpoint without one, with a missing or truncated
file, or with a file whose hash differs is refused, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from megatron_hapo.parallel import runtime

MANIFEST = "manifest.json"
_CHUNK = 8 * 2**20


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 8 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while piece := handle.read(_CHUNK):
            digest.update(piece)
    return digest.hexdigest()


def _listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    return (runtime.rank(), runtime.world_size())


def write_manifest(directory: Path) -> None:
    """Hash every file of ``directory`` (shared over the ranks) and write ``manifest.json`` (collective)."""
    rank, world = rank_world()
    if world > 1:
        runtime.barrier()  # every rank's files are complete
    names = _listing(directory)
    mine = {
        name: {"bytes": (directory / name).stat().st_size, "sha256": file_digest(directory / name)}
        for name in names[rank::world]
    }
    merged: dict[str, dict] = {}
    for part in runtime.all_gather_objects(mine):  # the whole job (``None`` there is the default group)
        merged.update(part)
    if rank == 0:
        with (directory / MANIFEST).open("w") as handle:
            json.dump({"files": merged}, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
    if world > 1:
        runtime.barrier()


def verify_manifest(directory: Path) -> list[str]:
    """What is wrong with the checkpoint ``directory`` (empty: intact); the same list on every rank (collective)."""
    rank, world = rank_world()
    problems: list[str] = []
    manifest = directory / MANIFEST
    if not manifest.is_file():
        problems.append(f"{directory.name}: no {MANIFEST} (incomplete or written by an older version)")
        files: dict[str, dict] = {}
    else:
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError) as exc:
            problems.append(f"{directory.name}: unreadable {MANIFEST} ({exc})")
            files = {}
    for index, (name, expected) in enumerate(sorted(files.items())):
        path = directory / name
        if not path.is_file() or path.stat().st_size != expected["bytes"]:
            if rank == 0:  # reported once; every rank sees the same file system
                found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
                problems.append(f"{directory.name}/{name}: {found}, the manifest says {expected['bytes']} bytes")
        elif index % world == rank and file_digest(path) != expected["sha256"]:
            problems.append(f"{directory.name}/{name}: SHA-256 differs from the manifest (corrupted)")
    if world == 1:
        return problems
    return sorted({p for part in runtime.all_gather_objects(problems) for p in part})
