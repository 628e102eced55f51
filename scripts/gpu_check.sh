#!/usr/bin/env bash
# On a GPU machine: report the GPU stack, run the `gpu`-marked tests, write
# benchmarks/results/gpu-check.json. Needs only a python3 with torch, onnxruntime-gpu, onnx,
# numpy and pytest (no venv: the GPU machine has no registry). PYTHON=... picks another python.
# Exits with pytest's status.
set -uo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
python="${PYTHON:-python3}"
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p benchmarks/results
junit="$(mktemp --suffix=.xml)"
trap 'rm -f "$junit"' EXIT

# Only the files that hold gpu tests: the others need packages the GPU machine may lack
# (pymetis, torchserve), and one import error would stop the whole collection.
mapfile -t files < <(grep -l "pytest.mark.gpu" tests/test_*.py)
"$python" -m pytest -m gpu -v -p no:cacheprovider --junitxml="$junit" "${files[@]}"
status=$?

"$python" - "$status" "$junit" benchmarks/results/gpu-check.json <<'EOF'
import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

status, junit, target = int(sys.argv[1]), sys.argv[2], sys.argv[3]
report = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
          "python": platform.python_version(), "pytest_exit": status}
try:
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip().splitlines()
    report["gpus"] = [dict(zip(("name", "driver", "memory"), (f.strip() for f in line.split(","))))
                      for line in smi]
except Exception as exc:
    report["gpus"] = f"nvidia-smi failed: {exc}"
try:
    import torch
    report["torch"] = torch.__version__
    report["torch_cuda"] = torch.version.cuda
    report["torch_sees_gpu"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        report["torch_device"] = torch.cuda.get_device_name(0)
except Exception as exc:
    report["torch"] = f"import failed: {exc}"
try:
    import onnxruntime as ort
    report["onnxruntime"] = ort.__version__
    report["ort_device"] = ort.get_device()
    report["ort_available_providers"] = ort.get_available_providers()
except Exception as exc:
    report["onnxruntime"] = f"import failed: {exc}"
try:
    from handlers.executors.cuda import cuda_unavailable_reason
    report["cuda_unavailable_reason"] = cuda_unavailable_reason()
except Exception as exc:
    report["cuda_unavailable_reason"] = f"import failed: {exc}"
tests = []
try:
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "")[:500]
                break
        else:
            message = ""
        tests.append({"test": case.get("name"), "outcome": outcome, "message": message,
                      "seconds": float(case.get("time") or 0)})
except Exception as exc:
    report["junit"] = f"unreadable: {exc}"
report["tests"] = tests
report["counts"] = {o: sum(t["outcome"] == o for t in tests)
                    for o in ("passed", "failed", "error", "skipped")}
with open(target, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
    f.write("\n")
print(json.dumps({k: v for k, v in report.items() if k != "tests"}, indent=1))
print(f"wrote {target}")
EOF
exit "$status"
