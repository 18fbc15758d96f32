"""Run a function on ``world`` local CPU processes joined by a gloo process group (tools and self-checks)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, rendezvous: str, body: Callable[..., None], args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        body(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_local_ranks(body: Callable[..., None], world: int, *args: Any) -> None:
    """Call the module-level ``body(rank, world, *args)`` on ``world`` processes; a failing rank raises here."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, str(Path(tmp) / "rendezvous"), body, args), nprocs=world, join=True)
