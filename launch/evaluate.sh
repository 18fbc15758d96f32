#!/usr/bin/env bash
# Evaluate models on benchmarks on a Slurm allocation (python -m megatron_hapo.evaluate, one rank per GPU; the
# engine replicas divide each benchmark's prompts). From the repository root:
#   sbatch --nodes=1 --gpus-per-node=8 launch/evaluate.sh runs/qwen2.5-math-7b-hapo/checkpoints/step_000200 \
#       /models/Qwen2.5-Math-7B --config runs/qwen2.5-math-7b-hapo/config.json \
#       --set aime24=/data/aime-2024.parquet --set math500=/data/math500.jsonl --out runs/eval-7b-200
# Arguments are the evaluate command's (models, --set, --config, key=value overrides such as
# engine.tensor_parallel=2, --n, --k, --out); rank logs go to runs/$RUN_NAME/logs/, eval.json to --out. A
# Megatron checkpoint is exported once, by rank 0, into --out/.exports (removed at the end). The command's own
# flags: .venv/bin/python -m megatron_hapo.evaluate --help
#SBATCH --job-name=hapo-evaluate
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
REPO_ROOT="${MEGATRON_HAPO_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
LAUNCH_MODULE=megatron_hapo.evaluate
RUN_NAME="${RUN_NAME:-evaluate-${SLURM_JOB_ID:-local}}"
# shellcheck source=launch/_run.sh
source "$REPO_ROOT/launch/_run.sh"
