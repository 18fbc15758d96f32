"""Helpers of the GPU tests (imported by their conftest and modules; pytest puts this folder on ``sys.path``)."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_MISSING = "vLLM is not installed (GPU build needed; the one-call check machine has none)"
TE_MISSING = "Transformer Engine is not installed (GPU build needed; the one-call check machine has none)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gpu_check_module() -> ModuleType:
    """``scripts/gpu_check.py`` as a module: its tiny inputs and run settings are shared with these tests."""
    if "gpu_check" in sys.modules:
        return sys.modules["gpu_check"]
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module
