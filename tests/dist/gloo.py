"""Run a test body on several CPU ranks joined by a gloo process group (one process per rank)."""

from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, body: Callable[[int, int], None]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        body(rank, world)
    except BaseException:
        dist.destroy_process_group()  # mp.spawn stops the other ranks
        raise
    # every rank done before any tears its gloo pairs down: a rank that destroyed the group while another was
    # still completing the body's last collective aborted that one once in CI ("terminate called without an
    # active exception", SIGABRT in tests/dist/test_divided_rollout.py)
    dist.barrier()
    dist.destroy_process_group()


def run_on_ranks(body: Callable[[int, int], None], world: int, tmp_path: Path) -> None:
    """Call the module-level function ``body(rank, world)`` on ``world`` ranks; a failing rank fails the test."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    mp.spawn(_entry, args=(world, str(tmp_path / "rendezvous"), body), nprocs=world, join=True)
