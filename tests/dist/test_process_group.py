"""`runtime.process_group`: the ranks leave the group together on a normal exit, at once on an exception."""

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from megatron_hapo.parallel import runtime
from megatron_hapo.parallel.local_launch import run_local_ranks


def _slow_rank_zero(rank: int, world: int, tmp: str) -> None:
    """Rank 0's body ends 1 s after the others'; no rank may leave the group before it has ended."""
    done = Path(tmp) / "rank-0-done"
    with runtime.process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world):
        if rank == 0:
            time.sleep(1.0)
            done.write_text("")
    assert done.is_file(), f"rank {rank} left the process group before rank 0's body ended"
    assert not runtime.initialized()


def _failing_body(rank: int, world: int, tmp: str) -> None:
    """An exception leaves the group at once (no barrier: the peers may be dead) and reaches the caller."""
    try:
        with runtime.process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world):
            raised = time.monotonic()
            raise KeyError("the body failed")
    except KeyError:
        assert not runtime.initialized()
        (Path(tmp) / f"left-{rank}").write_text(str(time.monotonic() - raised))
        return
    raise AssertionError("the body's exception was swallowed")


def test_ranks_leave_the_group_together(tmp_path: Path) -> None:
    mp.spawn(_slow_rank_zero, args=(3, str(tmp_path)), nprocs=3, join=True)


def test_a_failing_body_leaves_the_group_without_waiting(tmp_path: Path) -> None:
    mp.spawn(_failing_body, args=(2, str(tmp_path)), nprocs=2, join=True)
    # from the raise to the caller, in each rank (not the spawn and imports, which a loaded machine slows): a
    # barrier there would wait for gloo's 30-minute timeout; 30 s is only a bound far from both
    left = [float((tmp_path / f"left-{rank}").read_text()) for rank in range(2)]
    assert max(left) < 30, left


def _group_timeouts(rank: int, world: int, out: str) -> None:
    """The timeouts every group of the job holds: the default one, Megatron's (and their gloo twins), ours."""
    from megatron.core import parallel_state as mpu

    runtime.initialize_model_parallel(1, 2)
    groups = {
        "default": None,
        "pipeline": mpu.get_pipeline_model_parallel_group(),
        "tensor": mpu.get_tensor_model_parallel_group(),
        "data_gloo": mpu.get_data_parallel_group_gloo(),
    }
    minutes = {name: runtime.group_timeout(group).total_seconds() / 60 for name, group in groups.items()}
    if rank == 0:
        Path(out).write_text(json.dumps(minutes))


@pytest.mark.parametrize("timeout", [None, timedelta(minutes=7)], ids=["default", "7-minutes"])
def test_every_group_gets_the_job_timeout(tmp_path: Path, timeout: timedelta | None) -> None:
    """``parallel.timeout_minutes`` (60 by default, not NCCL's 10) reaches the default group and Megatron's."""
    out = tmp_path / "timeouts.json"
    run_local_ranks(_group_timeouts, 2, str(out), device="cpu", rendezvous_dir=tmp_path, timeout=timeout)
    expected = (timeout or runtime.DEFAULT_TIMEOUT).total_seconds() / 60
    assert expected == (7 if timeout else 60)
    assert json.loads(out.read_text()) == dict.fromkeys(("default", "pipeline", "tensor", "data_gloo"), expected)
