#!/usr/bin/env bash
# Any run or preset config on this machine through the same launch path as the Slurm scripts:
#   bash launch/local.sh CONFIG [key=value ...]
# GPUS_PER_NODE ranks (default: 8 with GPUs, else 1 CPU rank), NNODES simulated nodes (default 1); ranks join
# one process group over localhost (NCCL on GPUs, gloo on CPU). The run writes to runs/<config name>.
set -euo pipefail
if (($# < 1)); then
    echo "usage: bash launch/local.sh CONFIG [key=value ...]" >&2
    exit 2
fi
REPO_ROOT="${MEGATRON_HAPO_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"  # sbatch runs a copy
if [[ "$1" != --help && "$1" != -h ]]; then  # else launch/_run.sh prints the usage
    RUN_CONFIG="$1"
    shift
fi
config_name="$(basename "${RUN_CONFIG:-local}")"
RUN_NAME="${RUN_NAME:-${config_name%.yaml}}"
# shellcheck source=launch/_run.sh
source "$REPO_ROOT/launch/_run.sh"
