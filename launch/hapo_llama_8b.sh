#!/usr/bin/env bash
# Llama-3.1-8B-Instruct with HAPO (configs/runs/llama-3.1-8b-hapo.yaml) on 4 nodes x 8 GPUs. From the repository root:
#   sbatch launch/hapo_llama_8b.sh model.path=/path/to/checkpoint data.train_file=/path/to/dapo-math-17k.parquet \
#       data.eval_file=/path/to/valid.parquet
# Check the layout first, no GPU needed: .venv/bin/python tools/plan.py configs/runs/llama-3.1-8b-hapo.yaml --nodes 4 --gpus-per-node 8
# Requeued on the pre-time-limit signal (USR1 600 s before the limit: the stop lead time tools/plan.py
# estimates); a requeued job resumes from its last checkpoint (launch/README.md).
#SBATCH --job-name=llama-3.1-8b-hapo
#SBATCH --nodes=4
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
REPO_ROOT="${MEGATRON_HAPO_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
RUN_CONFIG=configs/runs/llama-3.1-8b-hapo.yaml
RUN_NAME="${RUN_NAME:-llama-3.1-8b-hapo}"
# shellcheck source=launch/_run.sh
source "$REPO_ROOT/launch/_run.sh"
