#!/usr/bin/env bash
# The main job on a laptop-class CPU: set up .venv/ (idempotent), then
#   1. the algorithm self-check: every preset in configs/algo/ learns a toy verifiable task through the real
#      megatron_hapo.algos code path (extra arguments go here, e.g. `configs/algo/hapo.yaml --steps 60`);
#   2. the Megatron self-check: a tiny Megatron-Core GPT, tensor-parallel over 2 gloo ranks, learns the same
#      task with HAPO through get_forward_backward_func and the vocabulary-parallel loss;
#   3. the RL demo: a short supervised warm-up, then HAPO and DAPO side by side through the whole stack (Megatron
#      TP2, a colocated vLLM engine, verifier workers, verified weight sync) on a synthetic verifiable task
#      (modular addition); a summary table and runs/rl_demo/curves.png; skipped when vLLM is absent.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo_root/scripts/setup_venv.sh"
cd "$repo_root"
"$repo_root/.venv/bin/python" -m megatron_hapo.selfcheck "$@"
"$repo_root/.venv/bin/python" -m megatron_hapo.megatron_selfcheck
if "$repo_root/.venv/bin/python" -c "import vllm" 2>/dev/null; then
    exec "$repo_root/.venv/bin/python" -m megatron_hapo.rl_demo
fi
echo "[quickstart] vLLM is not installed (MEGATRON_HAPO_VLLM=\"\"): the RL demo is skipped"
