#!/usr/bin/env bash
# Download, on a machine with access to PyPI, the wheels that the GPU check machine lacks into .gpu_wheels/
# (git-ignored; the device runner carries it to the GPU node: `carry: [".gpu_wheels"]`). See docs/GPU.md.
#
#   bash scripts/fetch_gpu_wheels.sh        # idempotent: returns at once when every wheel is already there
#
# The check machine has a fixed image: CPython 3.12 on manylinux x86_64, CUDA torch (with triton) and
# transformers, but no network, no megatron-core, no pytest. scripts/gpu_check.sh installs from this folder only
# what that image lacks (`pip install --no-index --find-links .gpu_wheels --no-deps`). What is carried, and why:
#   megatron-core==0.19.2  the trainer (pinned in setup.py); a cp312 platform wheel, installed with --no-deps (its
#                          one real dependency beyond torch/numpy/packaging is psutil, below)
#   psutil                 megatron-core's torch_dist checkpoint saving imports it
#   tensorboard, protobuf, absl-py
#                          megatron_hapo.trainer.metrics.MetricsWriter opens torch.utils.tensorboard.SummaryWriter
#                          on every run (train.py); that needs exactly these three (grpcio, pillow, werkzeug,
#                          markdown, tensorboard-data-server are tensorboard's server side: not needed to write events)
#   pytest, pluggy, iniconfig, pygments
#                          `python -m pytest tests/gpu` (packaging, the fourth dependency, comes with transformers)
# Everything else the train path imports at module level (numpy, pyyaml, packaging, safetensors, tokenizers, tqdm,
# jinja2) comes with torch or transformers; pyarrow (parquet only), matplotlib (plots only), math-verify and
# wandb (optional) are imported lazily and are not needed by the check. The versions are those of the CPU venv
# (scripts/setup_venv.sh), so the GPU node runs the same code as CI.
#
# Environment knobs:
#   GPU_WHEELS_DIR      destination (default: <repo>/.gpu_wheels)
#   GPU_WHEELS_PYTHON   interpreter whose pip downloads (default: <repo>/.venv/bin/python, else python3)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${GPU_WHEELS_DIR:-$repo_root/.gpu_wheels}"
python_bin="${GPU_WHEELS_PYTHON:-}"
if [[ -z "$python_bin" ]]; then
    if [[ -x "$repo_root/.venv/bin/python" ]]; then
        python_bin="$repo_root/.venv/bin/python"
    else
        python_bin="python3"
    fi
fi

# name==version: keep in step with REQUIREMENTS in scripts/gpu_check.py (which installs them).
requirements=(
    "megatron-core==0.19.2"
    "psutil==7.2.2"
    "tensorboard==2.21.0"
    "protobuf==7.36.2"
    "absl-py==2.5.1"
    "pytest==9.2.0"
    "pluggy==1.7.0"
    "iniconfig==2.3.1"
    "pygments==2.21.0"
)
# The check machine: CPython 3.12, glibc manylinux x86_64 (manylinux_2_28 accepts the older 2_17 / 2014 tags too).
target=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
        --only-binary=:all:)

# A wheel file name starts with the distribution name normalised to lower case with "_" (PEP 427 / 503).
have_wheel() {
    local name="${1%%==*}" version="${1##*==}"
    name="$(echo "$name" | tr 'A-Z.-' 'a-z__')"
    compgen -G "$dest/${name}-${version}-*.whl" >/dev/null
}

mkdir -p "$dest"
missing=()
for requirement in "${requirements[@]}"; do
    have_wheel "$requirement" || missing+=("$requirement")
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "[fetch-gpu-wheels] $dest is complete (nothing to download)"
else
    echo "[fetch-gpu-wheels] downloading ${missing[*]} (CPython 3.12, manylinux x86_64, --no-deps)"
    "$python_bin" -m pip download --quiet --disable-pip-version-check --no-deps "${target[@]}" --dest "$dest" \
        "${missing[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    for requirement in "${missing[@]}"; do
        if ! have_wheel "$requirement"; then
            echo "[fetch-gpu-wheels] error: no wheel for $requirement in $dest after the download" >&2
            exit 1
        fi
    done
fi

# Drop wheels of other versions left by an older list (the folder must stay small and unambiguous).
for wheel in "$dest"/*.whl; do
    keep=0
    for requirement in "${requirements[@]}"; do
        name="$(echo "${requirement%%==*}" | tr 'A-Z.-' 'a-z__')"
        [[ "$(basename "$wheel")" == "${name}-${requirement##*==}-"* ]] && keep=1
    done
    if [[ $keep -eq 0 ]]; then
        echo "[fetch-gpu-wheels] removing stale $(basename "$wheel")"
        rm -f "$wheel"
    fi
done

(cd "$dest" && sha256sum ./*.whl >SHA256SUMS)
bytes="$(du -sb "$dest" | cut -f1)"
echo "[fetch-gpu-wheels] $dest: $(find "$dest" -name '*.whl' | wc -l) wheels, $((bytes / 1024)) KiB"
limit=$((32 * 1024 * 1024))  # the device runner carries at most 64 MiB with the repository
if [[ $bytes -gt $limit ]]; then
    echo "[fetch-gpu-wheels] error: $dest is over $((limit / 1024 / 1024)) MiB" >&2
    exit 1
fi
