"""This rank's platform: its device, its process group and Megatron's model-parallel state, decided in one place.

- :func:`rank_device` is the one answer to "where do this rank's tensors live": ``cuda:LOCAL_RANK`` when CUDA is
  available (set once by :func:`join_process_group`), else ``cpu``. Nothing else in the trainer guesses.
- :func:`collective_device` is where a collective over a given group must allocate: NCCL accepts only CUDA
  tensors, gloo only CPU ones.
- :func:`initialize_model_parallel` is the one model-parallel initialiser. On CPU it first applies the platform
  adapter :mod:`megatron_hapo.parallel.megatron_cpu` (Megatron-Core's CUDA-only internals given a CPU meaning);
  on a GPU that module is never imported.
- The small rank / world / barrier / broadcast helpers here are what the layers above ``parallel/`` use instead
  of ``torch.distributed`` (``tests/unit/test_layering.py`` holds that rule).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

#: ``LOCAL_RANK`` (torchrun, ``launch/_run.sh``) picks the GPU of a rank on its node.
LOCAL_RANK_ENV = "LOCAL_RANK"
#: How long a collective may wait before the job fails, unless the caller says otherwise (``parallel.timeout_minutes``
#: of a run): the default group, Megatron's groups and the gloo groups all get it. NCCL's own default is 10 minutes,
#: less than a synchronous checkpoint of a 70B model (~1 TB) on a shared file system may keep ranks in a barrier.
DEFAULT_TIMEOUT = timedelta(minutes=60)
_TIMEOUT: list[timedelta] = [DEFAULT_TIMEOUT]


#: The hardware queues CUDA gives a process. Megatron overlaps tensor-parallel communication (sequence
#: parallelism's all-gather / reduce-scatter, the asynchronous weight-gradient all-reduce) with GEMMs correctly
#: only if kernels run in the order they are issued: one queue, on GPUs before Blackwell. Megatron-LM refuses
#: to start otherwise (megatron/training/arguments.py); megatron-core only warns.
MAX_CONNECTIONS_ENV = "CUDA_DEVICE_MAX_CONNECTIONS"


def set_cuda_connections(tp: int) -> str | None:
    """Set ``CUDA_DEVICE_MAX_CONNECTIONS=1`` for a tensor-parallel trainer (``tp > 1``); call it before CUDA starts
    in this process (it is read when the CUDA context is made; spawned ranks inherit it). Without tensor
    parallelism it is left alone (CUDA's default of 8 queues lets the data-parallel gradient reduction overlap
    the backward). A value the user set wins. Returns the value the process runs with (``None``: CUDA's
    default)."""
    if tp > 1 and MAX_CONNECTIONS_ENV not in os.environ:
        os.environ[MAX_CONNECTIONS_ENV] = "1"
    return os.environ.get(MAX_CONNECTIONS_ENV)


def on_gpu() -> bool:
    """Whether this process trains on CUDA (``CUDA_VISIBLE_DEVICES=""`` forces the CPU path)."""
    return torch.cuda.is_available()


def rank_device() -> torch.device:
    """This rank's device: ``cuda:<current>`` (chosen from ``LOCAL_RANK`` by :func:`join_process_group`) or cpu."""
    if on_gpu():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend_for_device() -> str:
    """``nccl`` on GPU, ``gloo`` on CPU."""
    return "nccl" if on_gpu() else "gloo"


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a collective over ``group`` (``None``: the default group) must allocate its tensors."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def join_process_group(backend: str | None = None, *, timeout: timedelta | None = None, **init_kwargs: Any) -> None:
    """Set this rank's GPU from ``LOCAL_RANK`` (on CUDA), then join the launcher's default process group.

    ``timeout`` (default :data:`DEFAULT_TIMEOUT`) bounds every collective of the job: it is the default group's, and
    :func:`initialize_model_parallel` and :func:`host_group` give it to the groups they create.

    No ``device_id`` is bound to the default group, as in Megatron-LM (its commit "Don't pass device_id to
    torch.distributed.init_process_group, it causes hangs"): with a bound group every later ``new_group`` becomes
    an NCCL split that all ranks must call in the same order, so a group that only some ranks create would hang.
    """
    if on_gpu():
        world = int(init_kwargs.get("world_size", os.environ.get("WORLD_SIZE", "1")))
        if LOCAL_RANK_ENV not in os.environ and world > 1:
            raise RuntimeError(
                f"{LOCAL_RANK_ENV} is not set: with {world} ranks on GPUs each rank must know its GPU "
                "(torchrun and launch/_run.sh set it)"
            )
        torch.cuda.set_device(int(os.environ.get(LOCAL_RANK_ENV, "0")))
    _TIMEOUT[0] = timeout or DEFAULT_TIMEOUT
    dist.init_process_group(backend or backend_for_device(), timeout=_TIMEOUT[0], **init_kwargs)


def collective_timeout() -> timedelta:
    """The timeout this process's groups were created with (:func:`join_process_group`)."""
    return _TIMEOUT[0]


def group_timeout(group: dist.ProcessGroup | None = None) -> timedelta:
    """The timeout ``group`` (default: the whole job) actually holds, read from its backend."""
    group = group or dist.distributed_c10d._get_default_group()
    device = torch.device("cuda") if dist.get_backend(group) == "nccl" else torch.device("cpu")
    return group._get_backend(device).options._timeout


def leave_process_group() -> None:
    """Destroy the default process group if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(
    backend: str | None = None, *, timeout: timedelta | None = None, **init_kwargs: Any
) -> Iterator[None]:
    """Join the default process group for the body (as :func:`join_process_group`), then leave it together.

    On a normal exit every rank reaches a barrier before any destroys the group: a rank that tore its gloo pairs
    down while a peer was still completing the body's last collective aborted that peer in CI ("terminate called
    without an active exception", SIGABRT, from a local rank; a segmentation fault from a Slurm rank). On an
    exception the group is destroyed at once, without waiting for peers that may be dead; the launcher stops the
    rest.
    """
    join_process_group(backend, timeout=timeout, **init_kwargs)
    try:
        yield
    except BaseException:
        leave_process_group()
        raise
    barrier()
    leave_process_group()


def initialized() -> bool:
    """Whether this process has joined a process group."""
    return dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """World size (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    """A barrier over the whole job (nothing without a process group); on its backend's device."""
    if world_size() > 1:
        dist.barrier(device_ids=[torch.cuda.current_device()] if collective_device().type == "cuda" else None)


def broadcast_int(value: int, src: int = 0) -> int:
    """``value`` of global rank ``src`` on every rank."""
    if world_size() == 1:
        return value
    box = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.broadcast(box, src=src)
    return int(box.item())


def max_over_ranks(value: float, group: dist.ProcessGroup | None = None) -> float:
    """The maximum of ``value`` over ``group`` (the whole job by default); a non-finite value anywhere gives inf."""
    if world_size() == 1:
        return value
    box = torch.tensor([value], dtype=torch.float64, device=collective_device(group))
    nan = torch.tensor([0.0 if math.isfinite(value) else 1.0], dtype=torch.float64, device=box.device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(nan, op=dist.ReduceOp.MAX, group=group)  # MAX may drop NaN: count non-finite apart
    return float("inf") if nan.item() else float(box.item())


_HOST_GROUP: list[dist.ProcessGroup | None] = []


def host_group() -> dist.ProcessGroup | None:
    """A gloo group of the whole job, for large Python objects (``None`` where the job is gloo already).

    ``all_gather_object`` over NCCL pickles into CUDA tensors: world x the largest part on every GPU, at a
    moment the rollout engine holds its memory. Over gloo the same gather stays in host memory (Megatron keeps
    gloo twins of its groups for the same reason). The first call is collective (``new_group``)."""
    if not _HOST_GROUP:
        gloo = dist.get_backend() != "gloo"
        _HOST_GROUP.append(dist.new_group(backend="gloo", timeout=collective_timeout()) if gloo else None)
    return _HOST_GROUP[0]


def all_gather_objects(value: object, group: dist.ProcessGroup | None = None) -> list:
    """``value`` of every rank of ``group`` (the whole job by default), in rank order."""
    if world_size() == 1:
        return [value]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def broadcast_parts(
    local: list[torch.Tensor], dtypes: list[torch.dtype], owners: list[int], group: dist.ProcessGroup | None = None
) -> list[list[torch.Tensor]]:
    """Each owner's 1-D tensors ``local`` (one per entry of ``dtypes``; a rank that owns nothing passes any) on
    every rank of ``group`` (the whole job by default), in ``owners`` order (global ranks), in host memory.

    The element counts are all-gathered first (``len(dtypes)`` integers per rank); then each owner broadcasts its
    tensors as one byte buffer of their exact size. A rank receives the owners' bytes once: nothing from a rank
    that owns nothing and no padding (``all_gather_object`` sends every rank's pickle padded to the largest, to
    every rank). Returns ``[[tensor per dtype] per owner]``; this rank's own part is ``local`` itself."""
    if world_size() == 1:
        return [list(local)]
    me, device = dist.get_rank(), collective_device(group)
    counts = [t.numel() for t in local] if me in owners else [0] * len(dtypes)
    gathered = [torch.empty(len(dtypes), dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, torch.tensor(counts, dtype=torch.int64, device=device), group=group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    counts_of = {rank: part.tolist() for rank, part in zip(ranks, gathered, strict=True)}
    widths = [torch.empty(0, dtype=dtype).element_size() for dtype in dtypes]
    out = []
    for owner in owners:
        sizes = [n * width for n, width in zip(counts_of[owner], widths, strict=True)]
        if owner == me:
            buffer = torch.cat(
                [t.to(dtype).contiguous().view(torch.uint8) for t, dtype in zip(local, dtypes, strict=True)]
            )
        else:
            buffer = torch.empty(sum(sizes), dtype=torch.uint8)
        if buffer.numel():
            staged = buffer.to(device)
            dist.broadcast(staged, src=owner, group=group)
            buffer = staged.cpu()
        if owner == me:
            out.append(list(local))
            continue
        pieces = buffer.split(sizes)
        out.append([piece.clone().view(dtype) for piece, dtype in zip(pieces, dtypes, strict=True)])
    return out


@dataclass(frozen=True)
class ModelParallelLayout:
    """The initialised Megatron layout of this rank (what model builders need to know of it)."""

    tp: int
    pp: int
    vpp: int | None
    tp_rank: int
    pp_rank: int

    def first_stage(self, vp_stage: int | None) -> bool:
        """Whether virtual stage ``vp_stage`` of this rank holds the embedding."""
        from megatron.core import parallel_state as mpu  # noqa: PLC0415

        return mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)

    def last_stage(self, vp_stage: int | None) -> bool:
        """Whether virtual stage ``vp_stage`` of this rank holds the output layer."""
        from megatron.core import parallel_state as mpu  # noqa: PLC0415

        return mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)


def model_parallel_layout() -> ModelParallelLayout:
    """The layout of the initialised ``megatron.core.parallel_state``."""
    from megatron.core import parallel_state as mpu  # noqa: PLC0415

    return ModelParallelLayout(
        tp=mpu.get_tensor_model_parallel_world_size(),
        pp=mpu.get_pipeline_model_parallel_world_size(),
        vpp=mpu.get_virtual_pipeline_model_parallel_world_size(),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
    )


def quiet_logs() -> None:
    """Silence Megatron's import-time notices (no Apex / TE, deprecations): noise in tools and checks."""
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|absl|ShardedTensor).*")
    logging.getLogger("megatron").setLevel(logging.ERROR)


def initialize_model_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None, *, seed: int = 1234) -> None:
    """(Re)initialise Megatron's model-parallel state and its RNG tracker for this rank's platform.

    The default process group must exist (NCCL on GPU, gloo on CPU); ``tp * pp`` must divide its size (the rest
    is data parallel). On CPU the platform adapter :mod:`megatron_cpu` is applied first; on GPU it is not
    imported at all.
    """
    from megatron.core import parallel_state as mpu  # noqa: PLC0415
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: PLC0415

    if not on_gpu():
        from megatron_hapo.parallel import megatron_cpu  # noqa: PLC0415  (the CPU platform adapter only)

        megatron_cpu.install()
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        distributed_timeout_minutes=max(1, round(collective_timeout().total_seconds() / 60)),
    )
    model_parallel_cuda_manual_seed(seed)
