#!/usr/bin/env bash
# Builds (or refreshes) the project's virtualenv in .venv. Sourced by serve.sh and test.sh.
# torch is installed first and pinned: an unpinned resolve pulls a newer torch with GB of CUDA
# packages (../shared/NOTES.md). Re-runs are cheap: a stamp of pyproject.toml skips the install.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HETSERVE_VENV:-$repo_root/.venv}"
python_bin="${PYTHON:-python3}"
torch_version="${HETSERVE_TORCH_VERSION:-2.13.0}"
extras="${1:-dev}"
# The kserve SDK's models (tests/test_kserve.py), installed without their dependencies when the
# `kserve` extra is asked for (pyproject.toml says why).
kserve_sdk=("kserve==0.21.0" "kubernetes==37.0.1")

if [[ ! -x "$venv/bin/python" ]]; then
    echo "[setup] creating virtualenv at $venv"
    "$python_bin" -m venv "$venv"
fi
stamp="$venv/.hetserve-stamp"
want="$(cat "$repo_root/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)-$torch_version-$extras"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "[setup] installing torch==$torch_version"
"$venv/bin/python" -m pip install -q "torch==$torch_version"
echo "[setup] installing hetserve[$extras]"
"$venv/bin/python" -m pip install -q -e "$repo_root[$extras]"
if [[ ",$extras," == *",kserve,"* ]]; then
    echo "[setup] installing ${kserve_sdk[*]} (--no-deps)"
    "$venv/bin/python" -m pip install -q --no-deps "${kserve_sdk[@]}"
fi
# The install must not have replaced the pinned torch.
"$venv/bin/python" - "$torch_version" <<'PY'
import sys, torch
want = sys.argv[1]
if not torch.__version__.startswith(want):
    sys.exit(f"[setup] torch {torch.__version__} was installed, expected {want}")
PY
echo "$want" > "$stamp"
