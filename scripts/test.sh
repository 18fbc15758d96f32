#!/usr/bin/env bash
# The whole CPU test suite: set up .venv/ (idempotent), lint with ruff, type-check with mypy, then run pytest. GPU tests (tests/gpu,
# marker `gpu`) skip themselves without CUDA and are reported as skipped, never as passed.
# Extra arguments go to pytest (e.g. `-k entropy`).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo_root/scripts/setup_venv.sh"
cd "$repo_root"
echo "[test] ruff check + format check"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "[test] mypy (the packages listed in pyproject.toml [tool.mypy])"
.venv/bin/python -m mypy
echo "[test] pytest"
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
