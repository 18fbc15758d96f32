# shellcheck shell=bash
# The body every launch script sources: rendezvous, one rank per GPU, preemption and requeue.
#
# Set by the calling script: RUN_NAME, and RUN_CONFIG (a configs/runs/*.yaml file) for the trainer, or
# LAUNCH_MODULE (the module every rank runs; default megatron_hapo.train, launch/evaluate.sh: megatron_hapo.evaluate).
# Arguments: for the trainer dotted key=value overrides (model.path=..., data.train_file=...), else the module's own.
# Environment (all optional):
#   MODEL_PATH        HF checkpoint directory, passed as model.path=
#   RUN_ROOT          where run directories go, checkpoints included; the run writes to RUN_ROOT/RUN_NAME (default:
#                     $SCRATCH/megatron_hapo/runs where the cluster sets SCRATCH, its fast shared file system;
#                     else runs/ in the repository). A 70B checkpoint is about 1 TB: put it where writes are fast
#   GPUS_PER_NODE     ranks per node (default: what the job asked for, --ntasks-per-node or --gpus-per-node,
#                     else SLURM_GPUS_ON_NODE, else 8 on GPUs, else 1)
#   MASTER_ADDR       rendezvous address (default: the first node's NodeAddr in Slurm, 127.0.0.1 locally)
#   NNODES            nodes when running without Slurm (simulated on this machine; default 1)
#   MASTER_PORT       rendezvous port (default 29500 + SLURM_JOB_ID % 1000)
#   PYTHON            interpreter (default .venv/bin/python, else python3)
#   CONTAINER_IMAGE   pyxis/enroot image: srun --container-image (CONTAINER_MOUNTS: --container-mounts)
#   NCCL_* / TORCH_NCCL_*  passed through; the defaults below are documented in launch/README.md
set -euo pipefail

print_usage() {  # the calling script's header comment, its #SBATCH resources, and the environment read here
    local script="$1"
    sed -n '2,/^[^#]/{/^#SBATCH/d;/^# shellcheck/d;/^#/s/^# \{0,1\}//p}' "$script"
    if grep -q '^#SBATCH' "$script"; then
        echo
        echo "Slurm resources (sbatch options before the script name override them):"
        grep '^#SBATCH' "$script" | sed 's/^#SBATCH /  /'
    fi
    echo
    echo "Environment (all optional):"
    sed -n '/^# Environment/,/^set -euo/{/^#   /s/^#//p}' "$REPO_ROOT/launch/_run.sh"
}
for arg in "$@"; do  # --help anywhere: the usage, and nothing launched
    if [[ "$arg" == --help || "$arg" == -h ]]; then print_usage "$0"; exit 0; fi
done

LAUNCH_MODULE="${LAUNCH_MODULE:-megatron_hapo.train}"
export LAUNCH_MODULE  # read by every rank's shell
[[ "$LAUNCH_MODULE" != megatron_hapo.train ]] || : "${RUN_CONFIG:?the launch script must set RUN_CONFIG}"
: "${RUN_NAME:?the launch script must set RUN_NAME}"
cd "$REPO_ROOT"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
ranks_per_node() {  # what the job asked for: #SBATCH --exclusive hands over every GPU of a node (and
    # SLURM_GPUS_ON_NODE follows it), whatever --gpus-per-node said
    if [[ -n "${GPUS_PER_NODE:-}" ]]; then echo "$GPUS_PER_NODE"
    elif [[ -n "${SLURM_NTASKS_PER_NODE:-}" ]]; then echo "$SLURM_NTASKS_PER_NODE"
    elif [[ -n "${SLURM_GPUS_PER_NODE:-}" ]]; then echo "${SLURM_GPUS_PER_NODE##*:}"  # "8" or "h100:8"
    elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then echo "$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then echo 8
    else echo 1; fi
}
GPUS_PER_NODE="$(ranks_per_node)"
whole_number() {  # $1 names the variable, $2 its value: checked before any shell arithmetic touches it
    if ! [[ "$2" =~ ^[1-9][0-9]{0,5}$ ]]; then
        echo "[launch] $1='$2': a whole number is needed (e.g. $1=8)" >&2
        exit 2
    fi
}
whole_number GPUS_PER_NODE "$GPUS_PER_NODE"
whole_number NNODES "${NNODES:-1}"
[[ -z "${MASTER_PORT:-}" ]] || whole_number MASTER_PORT "$MASTER_PORT"
RUN_ROOT="${RUN_ROOT:-${SCRATCH:+$SCRATCH/megatron_hapo/runs}}"
RUN_DIR="${RUN_ROOT:-$REPO_ROOT/runs}/$RUN_NAME"
ATTEMPT="${SLURM_RESTART_COUNT:-0}"  # Slurm counts the requeues of a job; each attempt logs to its own directory
if [[ -n "${SLURM_JOB_ID:-}" ]]; then LOG_DIR="$RUN_DIR/logs/$SLURM_JOB_ID.$ATTEMPT"; else
    LOG_DIR="$RUN_DIR/logs/local-$(date +%Y%m%d-%H%M%S)"; fi
mkdir -p "$LOG_DIR"
# A rank that checkpointed on a stop signal exits 75; under srun it leaves this file and exits 0 instead, since
# srun --kill-on-bad-exit counts 75 as a failure, kills the other ranks and returns 143.
export STOP_FLAG="$LOG_DIR/stopped-for-requeue"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a hung collective fails the job
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

args=()
if [[ "$LAUNCH_MODULE" == megatron_hapo.train ]]; then
    args=("$RUN_CONFIG" "output.dir=$RUN_DIR")
    [[ -n "${MODEL_PATH:-}" ]] && args+=("model.path=$MODEL_PATH")
fi
args+=("$@")
EXIT_REQUEUE=75


write_launch_record() {  # nodes / GPUs / rendezvous of this attempt, for tools/scaling_study.py and the logs
    local gpu
    gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)"
    printf '{"nodes": %d, "gpus_per_node": %d, "gpu": "%s", "master_addr": "%s", "attempt": %d}\n' "$1" \
        "$GPUS_PER_NODE" "${gpu:-cpu}" "$MASTER_ADDR" "$ATTEMPT" >"$RUN_DIR/launch.json"
}

wait_for() {  # the exit status of process $1; a trapped signal interrupts `wait`, so wait again while it lives
    local code
    while true; do
        code=0
        wait "$1" || code=$?
        kill -0 "$1" 2>/dev/null || return "$code"
    done
}

rendezvous_address() {  # the first node's address as Slurm itself reaches it (NodeAddr), else its name
    local first addr
    first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    addr="$(scontrol show node "$first" -o 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)"
    echo "${addr:-$first}"
}

run_on_slurm() {
    export MASTER_ADDR="${MASTER_ADDR:-$(rendezvous_address)}"  # a given MASTER_ADDR wins
    export MASTER_PORT="${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"
    write_launch_record "$SLURM_JOB_NUM_NODES"
    local container=() srun_pid
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        container=(--container-image="$CONTAINER_IMAGE" --container-workdir="$REPO_ROOT")
        [[ -n "${CONTAINER_MOUNTS:-}" ]] && container+=(--container-mounts="$CONTAINER_MOUNTS")
    fi
    # One task per GPU. Each task's shell ignores the stop signals (the trainer inherits that until its own
    # handling is in place, the first thing it does) and turns the trainer's exit 75 into the stop flag.
    # The single quotes are deliberate: each task expands its own SLURM_PROCID / SLURM_LOCALID.
    # shellcheck disable=SC2016
    srun --kill-on-bad-exit=1 --ntasks-per-node="$GPUS_PER_NODE" --cpu-bind=none "${container[@]}" \
        --open-mode=append --output="$LOG_DIR/rank-%t.log" \
        bash -c 'trap "" USR1 TERM INT
                 export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
                 code=0
                 "$0" -m "$LAUNCH_MODULE" "$@" || code=$?
                 if ((code == 75)); then : >"$STOP_FLAG"; exit 0; fi
                 exit "$code"' "$PYTHON" "${args[@]}" &
    srun_pid=$!
    # `--signal=B:USR1...` / `scancel --signal=B:USR1` reach only this shell: srun passes it on to the ranks.
    # SIGTERM (scancel, time limit, drain) and SIGINT reach the ranks from Slurm itself: keep waiting for them.
    trap 'kill -USR1 "$srun_pid" 2>/dev/null || true' USR1
    trap 'TERMINATED=1; echo "[launch] SIGTERM/SIGINT: the ranks checkpoint and stop"' TERM INT
    wait_for "$srun_pid"
}

run_locally() {  # NNODES x GPUS_PER_NODE ranks on this machine, joined like the Slurm ones
    local nodes="${NNODES:-1}" world rank pids=()
    world=$((nodes * GPUS_PER_NODE))
    export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}" MASTER_PORT="${MASTER_PORT:-$((29500 + $$ % 1000))}"
    export WORLD_SIZE="$world"
    write_launch_record "$nodes"
    for ((rank = 0; rank < world; rank++)); do
        (trap '' USR1 TERM INT  # as under srun: ignored until the trainer's own handling is in place
         RANK=$rank LOCAL_RANK=$((rank % GPUS_PER_NODE)) exec "$PYTHON" -m "$LAUNCH_MODULE" "${args[@]}") \
            >"$LOG_DIR/rank-$rank.log" 2>&1 &
        pids+=($!)
    done
    # forward a stop request to every rank, as srun does; Ctrl-C reaches the ranks from the terminal itself
    trap 'kill -USR1 "${pids[@]}" 2>/dev/null || true' USR1
    trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM
    trap ':' INT
    local status=0 code pid
    for pid in "${pids[@]}"; do
        code=0
        wait_for "$pid" || code=$?
        if ((code != 0 && status == 0)); then status=$code; fi
    done
    return "$status"
}

TERMINATED=""  # set when Slurm SIGTERMs this batch shell: the job is being cancelled or timed out
echo "[launch] $RUN_NAME: ${RUN_CONFIG:-$LAUNCH_MODULE} -> $RUN_DIR (attempt $ATTEMPT; rank logs in $LOG_DIR)"
report_failure() {  # the ranks' first error line as the launcher's last line (the whole logs stay in LOG_DIR)
    local line
    line="$(grep -h -m1 -E '^(\[rank[0-9]+\]: )?[A-Za-z_.]*(Error|Exception): ' "$LOG_DIR"/rank-*.log 2>/dev/null \
        | head -n 1 || true)"
    if [[ -z "$line" ]]; then  # a one-line refusal (SystemExit) is the last line of its rank's log
        line="$(grep -h -v '^[[:space:]]*$' "$LOG_DIR"/rank-0.log 2>/dev/null | tail -n 1 || true)"
    fi
    echo "[launch] failed (exit $1): ${line:-no error line in the rank logs} (rank logs: $LOG_DIR)" >&2
}

status=0
if [[ -n "${SLURM_JOB_ID:-}" ]] && command -v srun >/dev/null 2>&1; then
    run_on_slurm || status=$?
else
    echo "[launch] no Slurm job here (no srun): ${NNODES:-1} node(s) x $GPUS_PER_NODE rank(s) on this machine"
    run_locally || status=$?
fi
if ((status == EXIT_REQUEUE)) || { ((status == 0)) && [[ -f "$STOP_FLAG" ]]; }; then
    if [[ -n "${SLURM_JOB_ID:-}" ]] && command -v scontrol >/dev/null 2>&1; then
        if [[ -n "$TERMINATED" ]]; then  # scancel or the time limit itself: slurmctld would requeue even that
            echo "[launch] checkpointed; job $SLURM_JOB_ID is being ended (SIGTERM), not requeued: submit again to resume"
            exit 0
        fi
        echo "[launch] checkpointed on a stop signal: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "[launch] checkpointed on a stop signal; run the same command again to resume"
    exit "$EXIT_REQUEUE"
fi
if ((status != 0)); then report_failure "$status"; fi
exit "$status"
