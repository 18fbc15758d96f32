"""Run Megatron-Core 0.19.2 on CPU over gloo: the patches its CUDA-only internals need, in one place.

A platform adapter: applied only on CPU, by the one model-parallel initialiser
(:func:`megatron_hapo.parallel.runtime.initialize_model_parallel`); a GPU process never imports it (``install``
refuses when CUDA is available).
Megatron-Core uses the CUDA device, streams and RNG unconditionally in a few hundred places; on CPU each of
these is given a CPU meaning (the facts are in ``docs/CPU_STACK.md``):

1. RNG: ``torch.cuda.{get,set}_rng_state`` / ``manual_seed`` and the tracker's ``_get/_set_cuda_rng_state``
   act on the CPU generator (the tensor-parallel RNG tracker forks it as it would fork the CUDA one).
2. ``torch.cuda.current_device()`` answers ``"cpu"`` (it is used as a ``device=`` argument everywhere).
3. ``torch.cuda.synchronize`` is a no-op; streams and events are inert stand-ins (CPU ops are synchronous).
4. Hard-coded ``device="cuda"`` factories and ``.to("cuda")`` / ``Tensor.cuda()``: one process-wide
   ``TorchFunctionMode`` maps the CUDA device to CPU.
5. ``Tensor.type()`` answers ``torch.cuda.*Tensor`` for CPU tensors (the optimizers compare those strings).
6. The default causal attention mask is built on CPU: with activation recomputation it is built again in
   backward, where the device mode of 4 is not active.

Every patch targets an internal of 0.19.2, so ``install`` checks the version and refuses another one rather
than half-working; porting to a new version means re-reading the places listed above.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

#: The only megatron-core release these patches were written against.
SUPPORTED_MEGATRON_CORE = "0.19.2"

_installed = False


class _InertStream:
    """A CUDA stream / event stand-in: CPU kernels run synchronously, so waits and records are no-ops."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return lambda *_args, **_kwargs: None

    def query(self) -> bool:
        return True


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpu(TorchFunctionMode):
    """Maps any ``device=cuda`` (keyword or ``Tensor.to`` positional) to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func in {torch.Tensor.to, torch.Tensor.cuda}:
            args = tuple("cpu" if _is_cuda(a) or (isinstance(a, int) and not isinstance(a, bool)) else a for a in args)
            if func is torch.Tensor.cuda:
                return args[0]
        return func(*args, **kwargs)


def _cpu_type(original: Any) -> Any:
    def tensor_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        # The process-wide function mode re-enters this wrapper from inside ``original``: rename only once.
        cpu_name = isinstance(result, str) and result.startswith("torch.") and not result.startswith("torch.cuda.")
        if not args and not kwargs and cpu_name and self.is_cpu:
            return result.replace("torch.", "torch.cuda.", 1)
        return result

    return tensor_type


def _inert_stream(*_args: Any, **_kwargs: Any) -> _InertStream:
    return _InertStream()


def _patch(owner: object, **replacements: object) -> None:
    """Set each attribute of ``owner`` (a module or class): the CPU stand-ins differ from the CUDA signatures on
    purpose (``current_device`` answers ``"cpu"``, streams are inert), so they are set, not assigned."""
    for name, value in replacements.items():
        setattr(owner, name, value)


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as tp_random  # noqa: PLC0415  (megatron only when installed)

    _patch(
        torch.cuda,
        get_rng_state=lambda device="cuda": torch.get_rng_state(),
        set_rng_state=lambda new_state, device="cuda": torch.set_rng_state(new_state),
        manual_seed=lambda seed: torch.default_generator.manual_seed(int(seed)),
    )
    tp_random._get_cuda_rng_state = lambda *_args, clone=False, **_kwargs: (
        torch.get_rng_state().clone() if clone else torch.get_rng_state()
    )
    tp_random._set_cuda_rng_state = lambda new_state, *_args, **_kwargs: torch.set_rng_state(new_state)


def _patch_causal_mask() -> None:
    """The default causal mask asks for ``device="cuda"``; under activation recomputation it is built again in
    backward, where the process-wide device mode is not active, so the function itself is replaced."""
    from megatron.core.fusions import fused_softmax  # noqa: PLC0415
    from megatron.core.transformer import utils  # noqa: PLC0415

    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    utils.get_default_causal_mask = causal_mask
    fused_softmax.get_default_causal_mask = causal_mask


def install() -> None:
    """Apply the patches to this process (idempotent). Call in every CPU rank before building a Megatron model."""
    global _installed  # noqa: PLW0603
    if _installed:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_cpu.install() is for CPU-only processes; CUDA is available here")
    version = importlib.metadata.version("megatron-core")
    if not version.startswith(SUPPORTED_MEGATRON_CORE):
        raise RuntimeError(
            f"megatron_cpu patches megatron-core {SUPPORTED_MEGATRON_CORE} internals; found {version}. "
            "Install the pinned version (scripts/setup_venv.sh) or port megatron_hapo/parallel/megatron_cpu.py."
        )
    _patch_rng()
    _patch(
        torch.cuda,
        current_device=lambda: "cpu",
        synchronize=lambda *_args, **_kwargs: None,
        empty_cache=lambda: None,
        current_stream=_inert_stream,
        default_stream=_inert_stream,
        Stream=_InertStream,
        Event=_InertStream,
        stream=lambda *_args, **_kwargs: contextlib.nullcontext(),
    )
    _patch(torch.Tensor, type=_cpu_type(torch.Tensor.type))
    _patch_causal_mask()
    _CudaToCpu().__enter__()  # process-wide: never exited
    _installed = True
