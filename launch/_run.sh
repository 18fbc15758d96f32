# shellcheck shell=bash
# The body every launch script sources: rendezvous, one rank per GPU, preemption and requeue.
#
# Set by the calling script: RUN_CONFIG (a configs/runs/*.yaml file) and RUN_NAME. Arguments: dotted
# key=value overrides for the trainer (model.path=..., data.train_file=...). Environment (all optional):
#   MODEL_PATH        HF checkpoint directory, passed as model.path=
#   RUN_ROOT          where run directories go (default runs/); the run writes to RUN_ROOT/RUN_NAME
#   GPUS_PER_NODE     ranks per node (default: SLURM_GPUS_ON_NODE, else 8 on GPUs, else 1)
#   NNODES            nodes when running without Slurm (simulated on this machine; default 1)
#   MASTER_PORT       rendezvous port (default 29500 + SLURM_JOB_ID % 1000)
#   PYTHON            interpreter (default .venv/bin/python, else python3)
#   CONTAINER_IMAGE   pyxis/enroot image: srun --container-image (CONTAINER_MOUNTS: --container-mounts)
#   NCCL_* / TORCH_NCCL_*  passed through; the defaults below are documented in launch/README.md
set -euo pipefail

: "${RUN_CONFIG:?the launch script must set RUN_CONFIG}"
: "${RUN_NAME:?the launch script must set RUN_NAME}"
cd "$REPO_ROOT"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
RUN_DIR="${RUN_ROOT:-$REPO_ROOT/runs}/$RUN_NAME"
LOG_DIR="$RUN_DIR/logs/${SLURM_JOB_ID:-local-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$LOG_DIR"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a hung collective fails the job
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

args=("$RUN_CONFIG" "output.dir=$RUN_DIR")
[[ -n "${MODEL_PATH:-}" ]] && args+=("model.path=$MODEL_PATH")
args+=("$@")
EXIT_REQUEUE=75

if command -v nvidia-smi >/dev/null 2>&1; then default_gpus=8; else default_gpus=1; fi
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$default_gpus}}"

write_launch_record() {  # nodes / GPUs of this job, for tools/scaling_study.py
    local gpu
    gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)"
    printf '{"nodes": %d, "gpus_per_node": %d, "gpu": "%s"}\n' "$1" "$GPUS_PER_NODE" "${gpu:-cpu}" >"$RUN_DIR/launch.json"
}

run_on_slurm() {
    local nodes master
    nodes="$SLURM_JOB_NUM_NODES"
    master="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    export MASTER_ADDR="$master" MASTER_PORT="${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"
    write_launch_record "$nodes"
    local container=()
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        container=(--container-image="$CONTAINER_IMAGE" --container-workdir="$REPO_ROOT")
        [[ -n "${CONTAINER_MOUNTS:-}" ]] && container+=(--container-mounts="$CONTAINER_MOUNTS")
    fi
    # one task per GPU; srun forwards the scheduler's signals (SIGUSR1 before the time limit, SIGTERM) to them.
    # The single quotes are deliberate: each task expands its own SLURM_PROCID / SLURM_LOCALID.
    # shellcheck disable=SC2016
    srun --kill-on-bad-exit=1 --ntasks-per-node="$GPUS_PER_NODE" --cpu-bind=none "${container[@]}" \
        --output="$LOG_DIR/rank-%t.log" \
        bash -c 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
                 exec "$0" -m megatron_hapo.train "$@"' "$PYTHON" "${args[@]}"
}

run_locally() {  # NNODES x GPUS_PER_NODE ranks on this machine, joined like the Slurm ones
    local nodes="${NNODES:-1}" world rank pids=()
    world=$((nodes * GPUS_PER_NODE))
    export MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-$((29500 + $$ % 1000))}" WORLD_SIZE="$world"
    write_launch_record "$nodes"
    for ((rank = 0; rank < world; rank++)); do
        RANK=$rank LOCAL_RANK=$((rank % GPUS_PER_NODE)) "$PYTHON" -m megatron_hapo.train "${args[@]}" \
            >"$LOG_DIR/rank-$rank.log" 2>&1 &
        pids+=($!)
    done
    # forward a stop request to every rank, as srun does
    trap 'kill -USR1 "${pids[@]}" 2>/dev/null || true' USR1
    trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM
    local status=0 code
    for pid in "${pids[@]}"; do
        while true; do
            code=0
            wait "$pid" || code=$?
            kill -0 "$pid" 2>/dev/null || break  # wait returned for a trapped signal, not the exit: wait again
        done
        if ((code != 0 && status == 0)); then status=$code; fi
    done
    return "$status"
}

echo "[launch] $RUN_NAME: $RUN_CONFIG -> $RUN_DIR (rank logs in $LOG_DIR)"
status=0
if [[ -n "${SLURM_JOB_ID:-}" ]] && command -v srun >/dev/null 2>&1; then
    run_on_slurm || status=$?
else
    echo "[launch] no Slurm job here (no srun): ${NNODES:-1} node(s) x $GPUS_PER_NODE rank(s) on this machine"
    run_locally || status=$?
fi
if ((status == EXIT_REQUEUE)); then
    if [[ -n "${SLURM_JOB_ID:-}" ]] && command -v scontrol >/dev/null 2>&1; then
        echo "[launch] checkpointed on a stop signal: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "[launch] checkpointed on a stop signal; run the same command again to resume"
fi
exit "$status"
