#!/usr/bin/env bash
# The project's test command: builds .venv if needed, lints, then runs the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k cut -x
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
bash scripts/setup_venv.sh "dev,bench"
venv="${HETSERVE_VENV:-$repo_root/.venv}"
echo "[test] ruff"
"$venv/bin/ruff" check .
echo "[test] pytest"
exec "$venv/bin/python" -m pytest -m "not gpu" "$@"
