#!/usr/bin/env bash
# The project's test command: builds .venv if needed, lints, then runs the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k cut -x
# Tests marked `slow` (the full 20,000-request soak) are left out; scripts/test.sh -m slow runs
# them (a later -m wins). `gpu` tests run with scripts/gpu_check.sh.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
bash scripts/setup_venv.sh "dev,bench,tune,kserve,hf"
venv="${HETSERVE_VENV:-$repo_root/.venv}"
echo "[test] ruff"
"$venv/bin/ruff" check .
echo "[test] mypy"
"$venv/bin/python" -m mypy
echo "[test] pytest"
exec "$venv/bin/python" -m pytest -m "not gpu and not slow" "$@"
