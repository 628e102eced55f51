"""CPU topology: which physical cores this worker may use, and how to group them.

Everything is read from /sys (tests point ``sys_root`` and ``cgroup_root`` at fake trees).
One logical CPU is kept per physical core because two SMT siblings running GEMM share one set of
execution units and slow each other down (seed 003); the cgroup CPU quota caps the core count
because a pod's limit, not the node's core count, is what the worker really gets.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

_CPU_DIR = re.compile(r"cpu(\d+)$")
_NODE_DIR = re.compile(r"node(\d+)$")
# A group spanning several sockets or NUMA nodes has no single one to report.
MIXED = -1


@dataclass(frozen=True)
class Core:
    cpu: int  # the logical CPU this core is used through (lowest allowed sibling)
    siblings: tuple[int, ...]  # all online logical CPUs of the core, ``cpu`` included
    core_id: int
    socket: int
    numa: int


@dataclass(frozen=True)
class Topology:
    cores: tuple[Core, ...]  # sorted by logical CPU
    quota_cpus: float | None = None  # cgroup CPU quota in CPUs; None = unlimited

    def __post_init__(self) -> None:
        if not self.cores:
            raise ValueError("a topology needs at least one core")

    @property
    def cpus(self) -> tuple[int, ...]:
        return tuple(c.cpu for c in self.cores)

    @property
    def sockets(self) -> tuple[int, ...]:
        return tuple(sorted({c.socket for c in self.cores}))

    @property
    def numa_nodes(self) -> tuple[int, ...]:
        return tuple(sorted({c.numa for c in self.cores}))

    def describe(self) -> str:
        quota = "no CPU quota" if self.quota_cpus is None else f"CPU quota {self.quota_cpus:g}"
        lines = [
            f"{len(self.cores)} physical cores on {len(self.sockets)} socket(s), "
            f"{len(self.numa_nodes)} NUMA node(s), {quota}"
        ]
        for node in self.numa_nodes:
            cores = [c for c in self.cores if c.numa == node]
            sockets = ",".join(str(s) for s in sorted({c.socket for c in cores}))
            lines.append(
                f"  numa {node} (socket {sockets}): cpus {format_cpu_list(c.cpu for c in cores)}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class CoreGroup:
    name: str
    cpus: tuple[int, ...]
    socket: int  # MIXED if the group spans sockets
    numa: int  # MIXED if the group spans NUMA nodes

    @classmethod
    def of(cls, cores: Iterable[Core]) -> CoreGroup:
        cores = sorted(cores, key=lambda c: c.cpu)
        if not cores:
            raise ValueError("a core group needs at least one core")
        sockets = {c.socket for c in cores}
        nodes = {c.numa for c in cores}
        cpus = tuple(c.cpu for c in cores)
        return cls(
            name="cpu" + format_cpu_list(cpus),
            cpus=cpus,
            socket=sockets.pop() if len(sockets) == 1 else MIXED,
            numa=nodes.pop() if len(nodes) == 1 else MIXED,
        )


def parse_cpu_list(text: str) -> list[int]:
    """Kernel cpulist format ("0-3,8,10-11") to a sorted list; raises ValueError if malformed."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo_text, hi_text = part.split("-", 1)
            lo, hi = int(lo_text), int(hi_text)
            if lo < 0 or hi < lo:
                raise ValueError(f"bad CPU range {part!r}")
            cpus.update(range(lo, hi + 1))
        else:
            cpu = int(part)
            if cpu < 0:
                raise ValueError(f"bad CPU number {part!r}")
            cpus.add(cpu)
    return sorted(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Inverse of parse_cpu_list: [0, 1, 2, 3, 8] -> "0-3,8"."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def probe(
    sys_root: str = "/sys",
    affinity: set[int] | None = None,
    cgroup_root: str = "/sys/fs/cgroup",
) -> Topology:
    """The physical cores this process may run on, restricted by affinity and the cgroup quota."""
    allowed = set(os.sched_getaffinity(0) if affinity is None else affinity)
    if not allowed:
        raise ValueError("empty CPU affinity set")
    cpu_root = Path(sys_root) / "devices" / "system" / "cpu"
    online = _online_cpus(cpu_root)
    usable = sorted(allowed & online) if online else sorted(allowed)
    if not usable:
        log.warning(
            "no CPU of the affinity set %s is online according to %s; using the affinity set",
            format_cpu_list(allowed),
            cpu_root,
        )
        usable = sorted(allowed)
    numa_of = _numa_map(Path(sys_root) / "devices" / "system" / "node")
    cores = _physical_cores(cpu_root, usable, numa_of)
    quota = read_cpu_quota(cgroup_root)
    if quota is not None:
        cores = _apply_quota(cores, quota)
    return Topology(cores=tuple(sorted(cores, key=lambda c: c.cpu)), quota_cpus=quota)


def usable_cores() -> int:
    """Physical cores this process may use (affinity, online CPUs and cgroup quota applied):
    the one count the CLI, the tuner and the worker-count default size things by."""
    return len(probe().cores)


def worker_core_count(cores: int, workers: int) -> int:
    """Cores each of ``workers`` TorchServe workers gets from ``cores``: the CPU launcher
    (torch.backends.xeon.run_cpu, ``--ninstances``) gives every instance cores // workers."""
    return max(1, cores // max(1, workers))


def worker_share(topology: Topology, workers: int) -> Topology:
    """The cores worker 0 gets when the launcher splits ``topology`` over ``workers`` instances."""
    return replace(topology, cores=topology.cores[: worker_core_count(len(topology.cores), workers)])


def read_cpu_quota(cgroup_root: str = "/sys/fs/cgroup") -> float | None:
    """The cgroup CPU limit in CPUs (v2 ``cpu.max``, else v1 CFS quota); None = unlimited."""
    root = Path(cgroup_root)
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        fields = v2.split()
        if fields and fields[0] == "max":
            return None
        try:
            quota = int(fields[0])
            period = int(fields[1]) if len(fields) > 1 else 100_000
        except (ValueError, IndexError):
            log.warning("ignoring unreadable cgroup cpu.max %r", v2)
            return None
        return _quota_cpus(quota, period)
    for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quota_text = _read(root / controller / "cpu.cfs_quota_us")
        if quota_text is None:
            continue
        try:
            quota = int(quota_text)
            period = int(_read(root / controller / "cpu.cfs_period_us") or "100000")
        except ValueError:
            log.warning("ignoring unreadable cgroup v1 CFS quota in %s", root / controller)
            return None
        return _quota_cpus(quota, period)
    return None


def core_groups(topology: Topology, policy: str) -> list[CoreGroup]:
    """Split the cores by ``numa``, ``socket`` or ``size:K`` (K cores, never across NUMA nodes)."""
    if policy == "numa":
        return [CoreGroup.of(cores) for cores in _by(topology.cores, "numa")]
    if policy == "socket":
        return [CoreGroup.of(cores) for cores in _by(topology.cores, "socket")]
    size = _parse_size_policy(policy)
    groups = []
    for cores in _by(topology.cores, "numa"):
        for start in range(0, len(cores), size):
            groups.append(CoreGroup.of(cores[start : start + size]))
    return groups


def plan_groups(topology: Topology, policy: str, min_groups: int = 1) -> list[CoreGroup]:
    """core_groups, with the largest groups split until there are ``min_groups`` if cores allow.

    Pipelining head and tail on CPUs alone needs two groups even where the policy gives one
    (a 2-core, one-socket box becomes two 1-core groups).
    """
    if min_groups < 1:
        raise ValueError(f"min_groups must be >= 1, got {min_groups}")
    by_cpu = {c.cpu: c for c in topology.cores}
    groups = [[by_cpu[cpu] for cpu in g.cpus] for g in core_groups(topology, policy)]
    while len(groups) < min_groups:
        splittable = [g for g in groups if len(g) > 1]
        if not splittable:
            log.warning(
                "policy %r: only %d core group(s) possible, %d wanted",
                policy,
                len(groups),
                min_groups,
            )
            break
        largest = max(splittable, key=lambda g: (len(g), -g[0].cpu))
        at = groups.index(largest)
        groups[at : at + 1] = _split(largest)
    return [CoreGroup.of(g) for g in sorted(groups, key=lambda g: g[0].cpu)]


def ort_affinity_string(group: CoreGroup) -> str:
    """ONNX Runtime's ``session.intra_op_thread_affinities`` for ``len(group.cpus)`` threads.

    ORT wants one entry per intra-op thread except the calling thread (pinned by the caller to
    ``group.cpus[0]``), and numbers processors from 1: "2" pins a thread to CPU 1.
    """
    return ";".join(str(cpu + 1) for cpu in group.cpus[1:])


def _split(cores: list[Core]) -> list[list[Core]]:
    # Cut on a NUMA boundary when the group has one, so halves stay local.
    nodes = sorted({c.numa for c in cores})
    if len(nodes) > 1:
        first = [c for c in cores if c.numa == nodes[0]]
        return [first, [c for c in cores if c.numa != nodes[0]]]
    half = (len(cores) + 1) // 2
    return [cores[:half], cores[half:]]


def _by(cores: Iterable[Core], attr: str) -> list[list[Core]]:
    buckets: dict[int, list[Core]] = defaultdict(list)
    for core in sorted(cores, key=lambda c: c.cpu):
        buckets[getattr(core, attr)].append(core)
    return [buckets[key] for key in sorted(buckets)]


def _parse_size_policy(policy: str) -> int:
    prefix, _, value = policy.partition(":")
    if prefix == "size" and value.isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(f"unknown core group policy {policy!r} (use 'numa', 'socket' or 'size:K')")


def _physical_cores(cpu_root: Path, usable: list[int], numa_of: dict[int, int]) -> list[Core]:
    found: dict[tuple[int, ...], Core] = {}
    degraded = False
    for cpu in usable:
        topo = cpu_root / f"cpu{cpu}" / "topology"
        core_id = _read_int(topo / "core_id")
        socket = _read_int(topo / "physical_package_id")
        siblings_text = _read(topo / "thread_siblings_list")
        try:
            siblings = parse_cpu_list(siblings_text) if siblings_text is not None else []
        except ValueError:
            siblings = []
        if core_id is None or socket is None or cpu not in siblings:
            degraded = True
            core_id, socket, siblings = cpu, 0, [cpu]
        socket = max(socket, 0)  # some VMs report -1
        key = tuple(siblings)
        if key in found:
            continue  # ``usable`` is sorted, so the first sibling seen is the lowest allowed one
        numa = numa_of.get(cpu, socket) if numa_of else socket
        found[key] = Core(cpu=cpu, siblings=key, core_id=core_id, socket=socket, numa=numa)
    if degraded:
        log.warning(
            "CPU topology under %s is missing or odd; treating unreadable CPUs as one core each "
            "on socket 0",
            cpu_root,
        )
    return list(found.values())


def _online_cpus(cpu_root: Path) -> set[int]:
    text = _read(cpu_root / "online")
    if text is not None:
        try:
            return set(parse_cpu_list(text))
        except ValueError:
            log.warning("ignoring unreadable %s: %r", cpu_root / "online", text)
    try:
        return {int(m.group(1)) for p in cpu_root.iterdir() if (m := _CPU_DIR.match(p.name))}
    except OSError:
        return set()


def _numa_map(node_root: Path) -> dict[int, int]:
    """CPU -> NUMA node; empty when the kernel exposes no node directory (NUMA = socket then)."""
    numa_of: dict[int, int] = {}
    try:
        entries = sorted(node_root.iterdir())
    except OSError:
        return numa_of
    for entry in entries:
        match = _NODE_DIR.match(entry.name)
        text = _read(entry / "cpulist") if match else None
        if text is None or match is None:
            continue
        try:
            for cpu in parse_cpu_list(text):
                numa_of[cpu] = int(match.group(1))
        except ValueError:
            log.warning("ignoring unreadable %s: %r", entry / "cpulist", text)
    return numa_of


def _apply_quota(cores: list[Core], quota: float) -> list[Core]:
    """Keep floor(quota) cores (>= 1), filling as few NUMA nodes as possible, lowest CPUs first."""
    keep = max(1, math.floor(quota + 1e-9))
    if keep >= len(cores):
        return cores
    nodes = _by(cores, "numa")
    fitting = [n for n in nodes if len(n) >= keep]
    if fitting:
        return fitting[0][:keep]
    chosen: list[Core] = []
    for node in sorted(nodes, key=lambda n: -len(n)):  # stable: equal sizes stay in node order
        chosen += node[: keep - len(chosen)]
        if len(chosen) == keep:
            break
    return chosen


def _quota_cpus(quota: int, period: int) -> float | None:
    if quota <= 0 or period <= 0:  # v1 writes -1 for "no limit"
        return None
    return quota / period


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def default_workers(physical_cores: int, gpus: int) -> int:
    """TorchServe workers for a box with ``physical_cores`` usable cores and ``gpus`` visible GPUs.

    TorchServe hands a worker one batch at a time, so one worker's cores idle between its batches
    (11-15 ms a batch on 2 cores, benchmarks/results/breakdown.json); a second worker, given
    its own cores by the CPU launcher, covers that gap. Beyond two, about 4 cores per worker: the
    IPEX launcher's latency mode runs 4 cores an instance and ORT's intra-op scaling flattens at
    serving batch sizes. With a GPU one worker, as before: its head's CUDA streams already overlap.
    """
    if isinstance(physical_cores, bool) or physical_cores < 1:
        raise ValueError(f"physical_cores must be >= 1, got {physical_cores!r}")
    if isinstance(gpus, bool) or gpus < 0:
        raise ValueError(f"gpus must be >= 0, got {gpus!r}")
    if gpus > 0 or physical_cores == 1:
        return 1
    return min(physical_cores, max(2, physical_cores // 4))


def split_cpu_groups(
    groups: Sequence[CoreGroup], head_groups: int
) -> tuple[list[CoreGroup], list[CoreGroup]]:
    """(head groups, tail groups) of a CPU-only worker: the first ``head_groups`` (at most all
    but one) for heads and the rest for tails; 0 or a single group: every group runs both."""
    if head_groups <= 0 or len(groups) < 2:
        return list(groups), list(groups)
    k = min(head_groups, len(groups) - 1)
    return list(groups[:k]), list(groups[k:])
