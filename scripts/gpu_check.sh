#!/usr/bin/env bash
# The one-call GPU check (docs/GPU.md): on a GPU node whose image has CUDA torch and transformers but no network,
# install from .gpu_wheels/ (scripts/fetch_gpu_wheels.sh) only what the image lacks, print the environment, then run
# scripts/gpu_check.py: the trainer's GPU path end to end on one GPU, one `[gpu-check] PASS|FAIL|SKIP` line per check.
#
#   bash scripts/fetch_gpu_wheels.sh          # once, on a machine with PyPI access
#   bash scripts/gpu_check.sh [--allow-cpu]   # on the GPU node (extra arguments go to scripts/gpu_check.py)
#
# Exit status: gpu_check.py's (0 only when every check passed); 2 when no usable Python was found. Results go to
# $OUT when set (the device runner brings that folder back), else runs/gpu_check/: gpu_check.log, summary.json,
# install.log, environment.txt and the logs of each stage. The whole check is kept under 8 minutes.
#
# Nothing is installed into the image: the missing wheels go to a private folder put first on PYTHONPATH (with the
# repository itself), using `pip install --no-index --find-links .gpu_wheels --no-deps --target`, or, where the
# image has no pip, by unpacking the wheels (they are zip files; none of the carried ones needs a build step).
#
# The check machine has no vLLM: the first node with CUDA vLLM must also run `python -m pytest tests/gpu -m gpu`,
# whose tests/gpu/test_vllm_gpu.py compares the adaptive-temperature records and metrics with vLLM's async
# scheduling on and off (engine.async_scheduling; docs/GPU.md, "The GPU path's second review").
#
# Environment knobs:
#   GPU_CHECK_PYTHON     interpreter (default: the first of python3, python that imports torch)
#   GPU_CHECK_WHEELS     wheel folder (default: <repo>/.gpu_wheels)
#   GPU_CHECK_DEPS       where missing wheels are installed (default: $TMPDIR/megatron_hapo_gpu_deps)
#   GPU_CHECK_TIMEOUT    hard limit in seconds for gpu_check.py (default: 460; its own stage limits sum to 450)
#   GPU_CHECK_PIP_ARGS   extra pip arguments (e.g. --ignore-requires-python to rehearse on another Python)
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir="${OUT:-$repo_root/runs/gpu_check}"
wheels="${GPU_CHECK_WHEELS:-$repo_root/.gpu_wheels}"
deps_dir="${GPU_CHECK_DEPS:-${TMPDIR:-/tmp}/megatron_hapo_gpu_deps}"
limit="${GPU_CHECK_TIMEOUT:-460}"
mkdir -p "$out_dir" "$deps_dir"
say() { echo "[gpu-check.sh] $*"; }

python_bin="${GPU_CHECK_PYTHON:-}"
if [[ -z "$python_bin" ]]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' >/dev/null 2>&1; then
            python_bin="$candidate"
            break
        fi
    done
fi
if [[ -z "$python_bin" ]]; then
    say "error: no python3 / python that imports torch; set GPU_CHECK_PYTHON" | tee "$out_dir/gpu_check.log"
    exit 2
fi

export PYTHONPATH="$deps_dir:$repo_root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# 1. what the image lacks, installed from the carried wheels only
mapfile -t missing < <("$python_bin" "$repo_root/scripts/gpu_check.py" --list-missing)
: >"$out_dir/install.log"
if [[ ${#missing[@]} -eq 0 ]]; then
    say "nothing to install: every carried requirement is present"
elif [[ ! -d "$wheels" ]]; then
    say "error: missing ${missing[*]} and no wheel folder $wheels (run scripts/fetch_gpu_wheels.sh and carry it)"
else
    say "installing ${missing[*]} from $wheels into $deps_dir"
    read -r -a pip_extra <<<"${GPU_CHECK_PIP_ARGS:-}"
    installed=0
    if "$python_bin" -m pip --version >/dev/null 2>&1; then
        if "$python_bin" -m pip install --disable-pip-version-check --no-index --find-links "$wheels" --no-deps \
            --target "$deps_dir" --upgrade ${pip_extra[@]+"${pip_extra[@]}"} "${missing[@]}" >>"$out_dir/install.log" 2>&1
        then
            installed=1
        else
            say "pip install failed (install.log, last lines below); unpacking the wheels instead"
            tail -n 10 "$out_dir/install.log"
        fi
    else
        say "no pip in the image: unpacking the wheels into $deps_dir"
    fi
    if [[ $installed -eq 0 ]]; then
        for requirement in "${missing[@]}"; do
            name="$(echo "${requirement%%==*}" | tr 'A-Z.-' 'a-z__')"
            version="${requirement#"${requirement%%==*}"}"
            version="${version#==}"
            wheel="$(compgen -G "$wheels/${name}-${version:-*}-*.whl" | head -n 1)"
            if [[ -z "$wheel" ]]; then
                say "error: no wheel for $requirement in $wheels"
            else
                "$python_bin" -m zipfile -e "$wheel" "$deps_dir" >>"$out_dir/install.log" 2>&1
            fi
        done
    fi
    mapfile -t still_missing < <("$python_bin" "$repo_root/scripts/gpu_check.py" --list-missing)
    if [[ ${#still_missing[@]} -gt 0 ]]; then
        say "error: still missing after the install: ${still_missing[*]} (the checks that need them will fail)"
    fi
fi

# 2. the environment
"$python_bin" - <<'EOF' 2>&1 | tee "$out_dir/environment.txt"
import importlib.metadata as md
import platform
import subprocess
import sys

import torch

print(f"python {sys.version.split()[0]} ({sys.executable}), {platform.platform()}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
    try:
        nccl = torch.cuda.nccl.version()
    except Exception as exc:  # only reported
        nccl = f"unknown ({type(exc).__name__})"
    print(f"  NCCL {'.'.join(map(str, nccl)) if isinstance(nccl, tuple) else nccl}, bf16 {torch.cuda.is_bf16_supported()}")
for dist in ("megatron-core", "transformers", "tokenizers", "safetensors", "numpy", "triton", "psutil",
             "tensorboard", "protobuf", "pytest", "vllm", "transformer-engine", "transformer_engine"):
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        version = "not installed"
    print(f"  {dist:20s} {version}")
try:
    print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip())
except (OSError, subprocess.SubprocessError) as exc:
    print(f"nvidia-smi: {exc}")
EOF

# 3. the check (its own limits sum to 450 s; this one is the backstop)
cd "$repo_root" || exit 2
if command -v timeout >/dev/null 2>&1; then
    timeout --signal=TERM --kill-after=15 "$limit" "$python_bin" scripts/gpu_check.py --out "$out_dir" "$@"
else
    "$python_bin" scripts/gpu_check.py --out "$out_dir" "$@"
fi
status=$?
if [[ $status -eq 124 || $status -eq 137 ]]; then
    say "error: scripts/gpu_check.py ran past $limit s and was stopped (see $out_dir)"
fi
exit "$status"
