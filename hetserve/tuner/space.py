"""What the tuner searches: the knobs, their choices on this box, and the shipped default (trial 0)."""

from __future__ import annotations

import glob
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handlers.artifact.contract import WHOLE_MODEL
from handlers.runtime.config import RuntimeConfig
from partitioner.auto_workers import workers_here

# model-config.yaml keys (top level or hetserve.*) and the launcher's, per knob
MODEL_KNOBS = ("workers", "batchSize", "maxBatchDelay", "ratio", "core_groups", "cpu_head_groups",
               "micro_batch", "spinning")
SERVER_KNOBS = ("allocator", "openmp")
ALLOCATOR_FLAGS = {"default": "--use-default-allocator", "jemalloc": "--enable-jemalloc",
                   "tcmalloc": "--enable-tcmalloc"}


@dataclass(frozen=True)
class Libraries:
    """What torch.backends.xeon.run_cpu can preload here, searched where it searches."""

    allocators: tuple[str, ...]  # besides "default"
    iomp: bool
    notes: tuple[str, ...] = ()


def launcher_library_dirs(env: Mapping[str, str]) -> list[Path]:
    dirs = [Path(env[v]) / "lib" for v in ("CONDA_PREFIX", "VIRTUAL_ENV") if env.get(v)]
    return dirs + [Path.home() / ".local" / "lib", *map(Path, ("/usr/local/lib", "/usr/local/lib64", "/usr/lib", "/usr/lib64"))]


def find_libraries(env: Mapping[str, str]) -> Libraries:
    dirs = launcher_library_dirs(env)

    def found(lib: str) -> bool:
        return any(glob.glob(str(d / f"lib{lib}.so")) for d in dirs)

    allocators = tuple(a for a in ("jemalloc", "tcmalloc") if found(a))
    notes = [f"{a}: not found as lib{a}.so in {', '.join(map(str, dirs))}; not offered "
             f"(Debian: apt-get install libjemalloc2 libtcmalloc-minimal4, then link the .so into $VIRTUAL_ENV/lib)"
             for a in ("jemalloc", "tcmalloc") if a not in allocators]
    iomp = found("iomp5")
    if not iomp:
        notes.append("Intel OpenMP (libiomp5.so) not found: only GNU OpenMP offered (pip install intel-openmp)")
    notes.append("ONNX Runtime here is not an OpenMP build: the OpenMP knob can only matter through "
                 "torch/numpy code in the worker, and the importance report shows whether it did")
    return Libraries(allocators, iomp, tuple(notes))


def search_space(cores: int, ratios: Sequence[float], libraries: Libraries,
                 max_workers: int = 4) -> dict[str, tuple]:
    """Every knob and its choices for a box with `cores` physical cores."""
    sizes = [k for k in (1, 2, 4, 8, 16, 32) if k < cores]
    return {
        "workers": tuple(w for w in (1, 2, 4, 8) if w <= min(cores, max_workers)),
        "core_groups": ("numa", "socket", *(f"size:{k}" for k in sizes)),
        "cpu_head_groups": (0, 1),
        "spinning": (False, True),
        "micro_batch": (0, 1, 2, 4),
        "batchSize": (1, 2, 4, 8, 16),
        "maxBatchDelay": (0, 2, 5, 10, 20, 50),
        "ratio": tuple(sorted({*ratios, WHOLE_MODEL})),
        "allocator": ("default", *libraries.allocators),
        "openmp": ("gnu", "intel") if libraries.iomp else ("gnu",),
    }


def shipped_defaults(model_config: Mapping[str, Any], default_ratio: float | None,
                     properties: Mapping[str, str]) -> dict[str, Any]:
    """The knobs as the archive and config/config.properties ship them: the tuner's trial 0."""
    config = RuntimeConfig.from_model_yaml(model_config)
    args = properties.get("cpu_launcher_args", "").split()
    allocator = next((a for a, flag in ALLOCATOR_FLAGS.items() if flag in args), "default")
    ratio = config.ratio if config.ratio is not None else default_ratio or WHOLE_MODEL
    return {
        "workers": workers_here(model_config.get("minWorkers")),
        "core_groups": config.core_groups,
        "cpu_head_groups": config.cpu_head_groups,
        "spinning": config.spinning,
        "micro_batch": config.micro_batch,
        "batchSize": int(model_config.get("batchSize") or 1),
        "maxBatchDelay": int(model_config.get("maxBatchDelay") or 0),
        "ratio": float(ratio),
        "allocator": allocator,
        "openmp": "gnu" if "--disable-iomp" in args else "intel",
    }


def with_defaults(space: Mapping[str, tuple], defaults: Mapping[str, Any]) -> dict[str, tuple]:
    """The space with each shipped default added to its knob's choices (trial 0 must fit)."""
    return {k: v if defaults.get(k, v[0]) in v else (*v, defaults[k]) for k, v in space.items()}


def launcher_args(allocator: str, openmp: str) -> str:
    return ALLOCATOR_FLAGS[allocator] + (" --disable-iomp" if openmp == "gnu" else "")
