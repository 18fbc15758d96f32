"""The environment the README's commands build: pinned stack present, setup idempotent."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def test_pinned_stack_imports():
    import megatron.core
    from megatron.core import parallel_state  # noqa: F401  (pulls in triton via pipeline_parallel)

    assert importlib.metadata.version("megatron-core") == "0.19.2"
    assert megatron.core.__version__.startswith("0.19.2")
    assert torch.__version__.startswith("2.")
    assert sys.version_info >= (3, 11)


def test_second_setup_installs_nothing():
    done = subprocess.run(["bash", str(REPO / "scripts/setup_venv.sh")], capture_output=True, text=True, check=True)
    assert "is up to date (nothing to install)" in done.stdout
    assert "installing" not in done.stdout
