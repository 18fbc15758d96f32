"""Run a test body on several CPU ranks joined by a gloo process group: the project's own local launcher."""

from collections.abc import Callable
from pathlib import Path

from megatron_hapo.parallel.local_launch import run_local_ranks


def run_on_ranks(body: Callable[[int, int], None], world: int, tmp_path: Path) -> None:
    """Call the module-level function ``body(rank, world)`` on ``world`` CPU ranks (gloo); a failing rank fails
    the test. ``tmp_path`` holds the rendezvous."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_local_ranks(body, world, device="cpu", rendezvous_dir=tmp_path)
