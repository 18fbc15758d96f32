#!/usr/bin/env bash
# The main job on a laptop-class CPU: set up .venv/ (idempotent), then the two demos, both through the trainer's
# own step (megatron_hapo.trainer.loop.train); each prints a progress line per step and a table, and sends the
# libraries' output to RUN_DIR/log.txt:
#   1. every algorithm preset learns a toy task (one rank: a tiny Llama in Megatron-Core, the in-process
#      transformers engine); extra arguments go here, e.g. `--presets hapo --steps 30 algo.entropy.sign=paper`;
#      runs/presets/;
#   2. the RL demo: HAPO and DAPO side by side through the whole stack (Megatron TP2, a colocated vLLM engine at
#      TP2, verifier workers, verified weight sync) after a supervised warm-up, on modular addition; a table and
#      runs/rl_demo/curves.png (per step and per generated sample); skipped when vLLM is absent.
# Each run replaces the previous run of the same demo.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo_root/scripts/setup_venv.sh"
cd "$repo_root"
"$repo_root/.venv/bin/python" -m megatron_hapo.demos.presets "$@"
if "$repo_root/.venv/bin/python" -c "import vllm" 2>/dev/null; then
    exec "$repo_root/.venv/bin/python" -m megatron_hapo.demos.rl_demo
fi
echo "[quickstart] vLLM is not installed (MEGATRON_HAPO_VLLM=\"\"): the RL demo is skipped"
