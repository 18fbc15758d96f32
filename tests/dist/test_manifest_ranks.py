"""Checkpoint manifests hashed across ranks: every file is in the manifest, and every rank reports a damaged one.

Each rank hashes its share of the files (``names[rank::world]``); the shares are gathered over the whole job.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from gloo import run_on_ranks


def _manifest_ranks(rank: int, world: int, directory: Path, out: Path) -> None:
    from megatron_hapo.parallel import runtime
    from megatron_hapo.trainer.manifest import MANIFEST, verify_manifest, write_manifest

    write_manifest(directory)
    listed = sorted(json.loads((directory / MANIFEST).read_text())["files"])
    runtime.barrier()
    if rank == 0:
        (directory / "file_3").write_bytes(b"corrupted, same size")  # hashed by rank 1 (names[1::2])
    runtime.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps({"listed": listed, "problems": verify_manifest(directory)}))


def test_every_file_is_listed_and_damage_is_seen_by_every_rank(tmp_path: Path) -> None:
    directory, out = tmp_path / "step_000001", tmp_path / "out"
    directory.mkdir()
    out.mkdir()
    for i in range(4):
        (directory / f"file_{i}").write_bytes(f"content {i} ".encode().ljust(20, b"."))
    run_on_ranks(partial(_manifest_ranks, directory=directory, out=out), 2, tmp_path / "ranks")
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["listed"] == [f"file_{i}" for i in range(4)], results[0]
    for result in results:
        assert result["problems"] == ["step_000001/file_3: SHA-256 differs from the manifest (corrupted)"], result
