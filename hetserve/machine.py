"""What a benchmark result was measured on: stamped into every results JSON."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "onnx", "onnxruntime-gpu", "onnxruntime", "pymetis", "scipy", "numpy", "torchserve")


def _first(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    from handlers.hardware.topology import usable_cores

    mem_kb = _first("/proc/meminfo", "MemTotal")
    versions = {}
    for dist in PACKAGES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu_model": _first("/proc/cpuinfo", "model name") or "unknown",
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "physical_cores_usable": usable_cores(),
        "ram_gib": round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }


def run_record() -> dict[str, Any]:
    """The exact command and the time: every committed result says how to reproduce it."""
    return {"command": shlex.join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
