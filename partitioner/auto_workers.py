"""``minWorkers: auto`` / ``maxWorkers: auto``: the worker count derived on the archiving box.

TorchServe parses both keys as integers, so ``auto`` never reaches a ``.mar``: packing an archive
replaces it with ``handlers.hardware.topology.default_workers`` of this box (usable physical cores
from the topology probe, GPUs the CUDA executors could use) and records the choice in the
manifest's ``producer.workers``, so later tools (deploy/kserve/build_storage.py) can tell a
derived count from one somebody asked for. ``resolve`` is pure; ``box`` is the probe.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from handlers.hardware.topology import default_workers, usable_cores

AUTO = "auto"
WORKER_KEYS = ("minWorkers", "maxWorkers")
# Where the choice lives in hetserve-manifest.json: manifest["producer"][PRODUCER_KEY].
PRODUCER_KEY = "workers"


@dataclass(frozen=True)
class WorkerChoice:
    """What ``auto`` became, and the box facts it was derived from."""

    min_workers: int
    max_workers: int
    physical_cores: int
    gpus: int
    auto_keys: tuple[str, ...]  # the keys that said ``auto`` (an explicit other one is kept)

    def note(self) -> str:
        gpus = "no GPU" if self.gpus == 0 else f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}"
        count = (str(self.min_workers) if self.min_workers == self.max_workers
                 else f"min {self.min_workers}, max {self.max_workers}")
        return f"workers: {count} (auto: {self.physical_cores} physical cores, {gpus})"

    def to_json(self) -> dict[str, Any]:
        return {"auto": True, "auto_keys": list(self.auto_keys), "minWorkers": self.min_workers,
                "maxWorkers": self.max_workers, "physical_cores": self.physical_cores, "gpus": self.gpus}


def asks_auto(config: Mapping[str, Any]) -> bool:
    return any(config.get(key) == AUTO for key in WORKER_KEYS)


def resolve(config: Mapping[str, Any], physical_cores: int, gpus: int) -> tuple[dict[str, Any], WorkerChoice | None]:
    """``config`` with each ``auto`` worker key replaced by an integer, and what was chosen
    (None when neither key says ``auto``: the config comes back unchanged).

    Both ``auto``: both the box default. One of them explicit: the other follows it, so that
    minWorkers <= maxWorkers still holds (``minWorkers: auto, maxWorkers: 1`` gives 1 and 1).
    """
    if not asks_auto(config):
        return dict(config), None
    n = default_workers(physical_cores, gpus)
    low, high = config.get("minWorkers", AUTO), config.get("maxWorkers", AUTO)
    if low == AUTO and high == AUTO:
        low = high = n
    elif low == AUTO:
        low = min(n, int(high))
    else:
        high = max(n, int(low))
    auto_keys = tuple(k for k in WORKER_KEYS if config.get(k) == AUTO)
    choice = WorkerChoice(int(low), int(high), physical_cores, gpus, auto_keys)
    return {**config, "minWorkers": choice.min_workers, "maxWorkers": choice.max_workers}, choice


def visible_gpus() -> int:
    """GPUs the CUDA executors could use here: 0 unless torch sees CUDA and ORT has its provider."""
    from handlers.executors.cuda import cuda_unavailable_reason

    if cuda_unavailable_reason() is not None:
        return 0
    import torch

    return int(torch.cuda.device_count())


def box() -> tuple[int, int]:
    """(usable physical cores, visible GPUs) of this machine."""
    return usable_cores(), visible_gpus()


def resolve_here(config: Mapping[str, Any]) -> tuple[dict[str, Any], WorkerChoice | None]:
    """``resolve`` on this box; probes only when a key says ``auto``."""
    if not asks_auto(config):
        return dict(config), None
    return resolve(config, *box())


def workers_here(value: Any) -> int:
    """A minWorkers value as the count it means on this box (``auto`` derived, absent 1)."""
    if value == AUTO:
        return default_workers(*box())
    return int(value or 1)
