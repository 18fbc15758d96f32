#!/usr/bin/env bash
# The main job on a laptop-class CPU: set up .venv/ (idempotent), then run the algorithm self-check, in which
# every preset in configs/algo/ learns a toy verifiable task through the real megatron_hapo.algos code path.
# Extra arguments go to the self-check (e.g. `configs/algo/hapo.yaml --steps 60 algo.entropy.sign=paper`).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo_root/scripts/setup_venv.sh"
cd "$repo_root"
exec "$repo_root/.venv/bin/python" -m megatron_hapo.selfcheck "$@"
