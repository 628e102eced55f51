"""Topology probing against fake /sys trees, core grouping policies, and ORT's affinity string."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest

from handlers.hardware.topology import (
    MIXED,
    Core,
    CoreGroup,
    Topology,
    core_groups,
    default_workers,
    format_cpu_list,
    ort_affinity_string,
    parse_cpu_list,
    plan_groups,
    probe,
    read_cpu_quota,
    worker_core_count,
    worker_share,
)


def make_sys(
    root: Path,
    *,
    sockets: int,
    cores_per_socket: int,
    smt: bool,
    numa_nodes: int | None,
) -> Path:
    """A /sys tree numbered like Linux on x86: siblings n and n + physical_cores."""
    physical = sockets * cores_per_socket
    logical = physical * (2 if smt else 1)
    cpu_root = root / "devices" / "system" / "cpu"
    cpu_root.mkdir(parents=True)
    (cpu_root / "online").write_text(f"0-{logical - 1}\n")
    for cpu in range(logical):
        core = cpu % physical
        topo = cpu_root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "core_id").write_text(f"{core % cores_per_socket}\n")
        (topo / "physical_package_id").write_text(f"{core // cores_per_socket}\n")
        siblings = f"{core},{core + physical}" if smt else f"{core}"
        (topo / "thread_siblings_list").write_text(siblings + "\n")
    if numa_nodes:
        per_node = physical // numa_nodes
        for node in range(numa_nodes):
            lo, hi = node * per_node, (node + 1) * per_node - 1
            text = f"{lo}-{hi}" + (f",{lo + physical}-{hi + physical}" if smt else "")
            node_dir = root / "devices" / "system" / "node" / f"node{node}"
            node_dir.mkdir(parents=True)
            (node_dir / "cpulist").write_text(text + "\n")
    return root


def no_cgroup(tmp_path: Path) -> str:
    path = tmp_path / "cgroup"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture
def two_socket_smt(tmp_path: Path) -> Path:
    return make_sys(tmp_path / "sys", sockets=2, cores_per_socket=4, smt=True, numa_nodes=2)


def test_parse_and_format_cpu_list_round_trip() -> None:
    assert parse_cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list("5\n") == [5]
    assert parse_cpu_list("") == []
    assert format_cpu_list([11, 10, 8, 3, 2, 1, 0]) == "0-3,8,10-11"
    for bad in ("3-1", "a", "1-", "-2"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def test_one_socket_four_cores_no_smt(tmp_path: Path) -> None:
    sys_root = make_sys(tmp_path / "sys", sockets=1, cores_per_socket=4, smt=False, numa_nodes=1)
    topo = probe(str(sys_root), affinity={0, 1, 2, 3}, cgroup_root=no_cgroup(tmp_path))
    assert topo.cpus == (0, 1, 2, 3)
    assert topo.sockets == (0,) and topo.numa_nodes == (0,)
    assert topo.quota_cpus is None
    assert [c.core_id for c in topo.cores] == [0, 1, 2, 3]
    assert "4 physical cores on 1 socket(s), 1 NUMA node(s), no CPU quota" in topo.describe()


def test_two_sockets_smt_keeps_one_cpu_per_physical_core(two_socket_smt: Path, tmp_path) -> None:
    topo = probe(str(two_socket_smt), affinity=set(range(16)), cgroup_root=no_cgroup(tmp_path))
    assert topo.cpus == tuple(range(8))
    assert topo.cores[5].siblings == (5, 13)
    assert [c.socket for c in topo.cores] == [0] * 4 + [1] * 4
    assert [c.numa for c in topo.cores] == [0] * 4 + [1] * 4
    assert "numa 1 (socket 1): cpus 4-7" in topo.describe()


def test_affinity_subset_uses_the_allowed_sibling(two_socket_smt: Path, tmp_path) -> None:
    # CPU 1's core is reachable only through its sibling 9; CPU 2's core through 2 only.
    topo = probe(str(two_socket_smt), affinity={0, 8, 9, 2, 12}, cgroup_root=no_cgroup(tmp_path))
    assert topo.cpus == (0, 2, 9, 12)
    by_cpu = {c.cpu: c for c in topo.cores}
    assert by_cpu[9].siblings == (1, 9) and by_cpu[9].socket == 0
    assert by_cpu[12].socket == 1 and by_cpu[12].numa == 1


def test_cgroup_v2_quota_smaller_than_affinity(two_socket_smt: Path, tmp_path) -> None:
    cgroup = tmp_path / "cg2"
    cgroup.mkdir()
    (cgroup / "cpu.max").write_text("350000 100000\n")
    topo = probe(str(two_socket_smt), affinity=set(range(16)), cgroup_root=str(cgroup))
    assert topo.quota_cpus == pytest.approx(3.5)
    # floor(3.5) = 3 cores, all from one NUMA node.
    assert topo.cpus == (0, 1, 2)
    assert {c.numa for c in topo.cores} == {0}


def test_quota_larger_than_a_node_fills_the_fewest_nodes(two_socket_smt: Path, tmp_path) -> None:
    cgroup = tmp_path / "cg2"
    cgroup.mkdir()
    (cgroup / "cpu.max").write_text("600000 100000\n")
    # Node 1 has 4 allowed cores, node 0 only 2: start from the larger node.
    topo = probe(str(two_socket_smt), affinity={0, 1, 4, 5, 6, 7}, cgroup_root=str(cgroup))
    assert topo.cpus == (0, 1, 4, 5, 6, 7)
    (cgroup / "cpu.max").write_text("500000 100000\n")
    topo = probe(str(two_socket_smt), affinity={0, 1, 4, 5, 6, 7}, cgroup_root=str(cgroup))
    assert topo.cpus == (0, 4, 5, 6, 7)


def test_quota_below_one_cpu_keeps_one_core(two_socket_smt: Path, tmp_path) -> None:
    cgroup = tmp_path / "cg2"
    cgroup.mkdir()
    (cgroup / "cpu.max").write_text("50000 100000")
    topo = probe(str(two_socket_smt), affinity={3, 4}, cgroup_root=str(cgroup))
    assert topo.quota_cpus == pytest.approx(0.5)
    assert topo.cpus == (3,)


def test_cgroup_v2_max_is_unlimited(tmp_path: Path) -> None:
    cgroup = tmp_path / "cg2"
    cgroup.mkdir()
    (cgroup / "cpu.max").write_text("max 100000\n")
    assert read_cpu_quota(str(cgroup)) is None
    (cgroup / "cpu.max").write_text("garbage\n")
    assert read_cpu_quota(str(cgroup)) is None


def test_cgroup_v1_quota(two_socket_smt: Path, tmp_path) -> None:
    cgroup = tmp_path / "cg1"
    (cgroup / "cpu,cpuacct").mkdir(parents=True)
    (cgroup / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("100000\n")
    (cgroup / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("50000\n")
    topo = probe(str(two_socket_smt), affinity=set(range(16)), cgroup_root=str(cgroup))
    assert topo.quota_cpus == pytest.approx(2.0)
    assert topo.cpus == (0, 1)
    (cgroup / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    assert read_cpu_quota(str(cgroup)) is None


def test_missing_node_dir_means_numa_is_socket(tmp_path: Path) -> None:
    sys_root = make_sys(tmp_path / "sys", sockets=2, cores_per_socket=2, smt=False, numa_nodes=None)
    topo = probe(str(sys_root), affinity={0, 1, 2, 3}, cgroup_root=no_cgroup(tmp_path))
    assert [c.numa for c in topo.cores] == [0, 0, 1, 1]


def test_missing_topology_degrades_with_a_warning(tmp_path: Path, caplog) -> None:
    sys_root = tmp_path / "sys"
    (sys_root / "devices" / "system" / "cpu" / "cpu0").mkdir(parents=True)
    (sys_root / "devices" / "system" / "cpu" / "cpu1").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="handlers.hardware.topology"):
        topo = probe(str(sys_root), affinity={0, 1}, cgroup_root=no_cgroup(tmp_path))
    assert topo.cpus == (0, 1)
    assert topo.sockets == (0,) and topo.numa_nodes == (0,)
    assert "missing or odd" in caplog.text


def test_empty_sys_tree_falls_back_to_affinity(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="handlers.hardware.topology"):
        topo = probe(str(tmp_path / "nothing"), affinity={2, 5}, cgroup_root=no_cgroup(tmp_path))
    assert topo.cpus == (2, 5)
    assert caplog.text


def test_odd_files_do_not_crash(two_socket_smt: Path, tmp_path) -> None:
    cpu_root = two_socket_smt / "devices" / "system" / "cpu"
    (cpu_root / "online").write_text("zero to seven")
    (cpu_root / "cpu3" / "topology" / "core_id").write_text("three")
    (two_socket_smt / "devices" / "system" / "node" / "node1" / "cpulist").write_text("x")
    topo = probe(str(two_socket_smt), affinity={1, 3, 5}, cgroup_root=no_cgroup(tmp_path))
    assert topo.cpus == (1, 3, 5)


def test_policies_numa_socket_size(two_socket_smt: Path, tmp_path) -> None:
    topo = probe(str(two_socket_smt), affinity=set(range(16)), cgroup_root=no_cgroup(tmp_path))
    numa = core_groups(topo, "numa")
    assert [g.cpus for g in numa] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [g.name for g in numa] == ["cpu0-3", "cpu4-7"]
    assert [(g.socket, g.numa) for g in numa] == [(0, 0), (1, 1)]
    assert [g.cpus for g in core_groups(topo, "socket")] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    # Chunks of 3 never straddle a NUMA node: each node leaves a 1-core remainder.
    assert [g.cpus for g in core_groups(topo, "size:3")] == [(0, 1, 2), (3,), (4, 5, 6), (7,)]
    assert [g.cpus for g in core_groups(topo, "size:1")] == [(c,) for c in range(8)]


@pytest.mark.parametrize("policy", ["", "numa2", "size:0", "size:-1", "size:x", "cores"])
def test_invalid_policy_names_itself(policy: str) -> None:
    topo = probe("/nonexistent", affinity={0}, cgroup_root="/nonexistent")
    with pytest.raises(ValueError, match=repr(policy).replace("[", r"\[")):
        core_groups(topo, policy)


def test_socket_group_spanning_numa_nodes_reports_mixed(tmp_path: Path) -> None:
    # Sub-NUMA clustering: one socket, two nodes.
    sys_root = make_sys(tmp_path / "sys", sockets=1, cores_per_socket=4, smt=False, numa_nodes=2)
    topo = probe(str(sys_root), affinity={0, 1, 2, 3}, cgroup_root=no_cgroup(tmp_path))
    (group,) = core_groups(topo, "socket")
    assert group.socket == 0 and group.numa == MIXED
    # Splitting it for two groups cuts on the NUMA boundary, not in the middle of a node.
    assert [g.cpus for g in plan_groups(topo, "socket", min_groups=2)] == [(0, 1), (2, 3)]


def test_plan_groups_two_core_box_gives_two_groups(tmp_path: Path) -> None:
    sys_root = make_sys(tmp_path / "sys", sockets=1, cores_per_socket=2, smt=False, numa_nodes=1)
    topo = probe(str(sys_root), affinity={0, 1}, cgroup_root=no_cgroup(tmp_path))
    assert [g.cpus for g in plan_groups(topo, "numa")] == [(0, 1)]
    assert [g.cpus for g in plan_groups(topo, "numa", min_groups=2)] == [(0,), (1,)]


def test_plan_groups_splits_largest_within_numa(two_socket_smt: Path, tmp_path) -> None:
    topo = probe(
        str(two_socket_smt), affinity={0, 1, 4, 5, 6, 7}, cgroup_root=no_cgroup(tmp_path)
    )
    groups = plan_groups(topo, "numa", min_groups=3)
    assert [g.cpus for g in groups] == [(0, 1), (4, 5), (6, 7)]
    assert all(g.numa != MIXED for g in groups)
    groups = plan_groups(topo, "numa", min_groups=5)
    assert sorted(len(g.cpus) for g in groups) == [1, 1, 1, 1, 2]
    assert sorted(c for g in groups for c in g.cpus) == [0, 1, 4, 5, 6, 7]


def test_plan_groups_stops_when_cores_run_out(tmp_path: Path) -> None:
    topo = probe("/nonexistent", affinity={0, 1}, cgroup_root="/nonexistent")
    assert [g.cpus for g in plan_groups(topo, "numa", min_groups=4)] == [(0,), (1,)]
    with pytest.raises(ValueError):
        plan_groups(topo, "numa", min_groups=0)


def test_ort_affinity_string_is_one_based_and_skips_the_caller() -> None:
    assert ort_affinity_string(CoreGroup("cpu0-3", (0, 1, 2, 3), 0, 0)) == "2;3;4"
    assert ort_affinity_string(CoreGroup("cpu4,6", (4, 6), 0, 0)) == "7"
    assert ort_affinity_string(CoreGroup("cpu5", (5,), 0, 0)) == ""
    group = CoreGroup("cpu8-11", (8, 9, 10, 11), 1, 1)
    # One entry per intra-op thread except the calling one.
    assert len(ort_affinity_string(group).split(";")) == len(group.cpus) - 1


def test_topology_needs_a_core() -> None:
    with pytest.raises(ValueError):
        Topology(cores=())


def test_real_machine_sanity() -> None:
    topo = probe()
    allowed = os.sched_getaffinity(0)
    assert len(topo.cores) >= 1
    assert set(topo.cpus) <= allowed
    groups = plan_groups(topo, "numa", min_groups=2 if len(topo.cores) >= 2 else 1)
    assert sorted(c for g in groups for c in g.cpus) == sorted(topo.cpus)


@pytest.mark.parametrize(("physical", "gpus", "workers"), [
    (1, 0, 1),  # one core: a second worker would only share it
    (2, 0, 2),  # at least two: one covers the other's gap between batches
    (3, 0, 2),
    (4, 0, 2),
    (8, 0, 2),
    (11, 0, 2),
    (12, 0, 3),  # then about 4 cores a worker
    (16, 0, 4),
    (17, 0, 4),
    (64, 0, 16),
    (1, 1, 1),  # a GPU visible: one worker, as before
    (16, 1, 1),
    (64, 8, 1),
])
def test_default_workers_table(physical: int, gpus: int, workers: int) -> None:
    assert default_workers(physical, gpus) == workers


@pytest.mark.parametrize(("physical", "gpus"), [(0, 0), (-1, 0), (2, -1), (True, 0)])
def test_default_workers_refuses_impossible_boxes(physical: int, gpus: int) -> None:
    with pytest.raises(ValueError):
        default_workers(physical, gpus)


def test_default_workers_counts_physical_cores_of_the_probe(two_socket_smt: Path, tmp_path) -> None:
    # 16 logical CPUs are 8 physical cores (SMT siblings do not count): 2 workers, not 4.
    topo = probe(str(two_socket_smt), affinity=set(range(16)), cgroup_root=no_cgroup(tmp_path))
    assert default_workers(len(topo.cores), gpus=0) == 2
    # A cgroup quota of 1.5 CPUs leaves one core: one worker.
    cgroup = tmp_path / "cg2"
    cgroup.mkdir()
    (cgroup / "cpu.max").write_text("150000 100000\n")
    topo = probe(str(two_socket_smt), affinity=set(range(16)), cgroup_root=str(cgroup))
    assert default_workers(len(topo.cores), gpus=0) == 1


def test_default_workers_on_a_large_fake_box(tmp_path: Path) -> None:
    sys_root = make_sys(tmp_path / "sys", sockets=2, cores_per_socket=16, smt=True, numa_nodes=2)
    topo = probe(str(sys_root), affinity=set(range(64)), cgroup_root=no_cgroup(tmp_path))
    assert len(topo.cores) == 32
    assert default_workers(len(topo.cores), gpus=0) == 8
    assert default_workers(len(topo.cores), gpus=2) == 1


def test_a_worker_gets_the_launchers_share_of_the_cores() -> None:
    # torch.backends.xeon.run_cpu --ninstances W gives each instance cores // W, at least one
    assert [worker_core_count(5, w) for w in (1, 2, 3, 8)] == [5, 2, 1, 1]
    box = Topology(tuple(Core(cpu=i, siblings=(i,), core_id=i, socket=0, numa=0) for i in range(4)))
    assert worker_share(box, 2).cpus == (0, 1)
    assert worker_share(box, 1) == box


def test_a_load_reads_the_cores_once_and_picks_its_partition_once(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """The runtime's assembly works the partition and the cores out once per load: a ratio
    that is not archived logs its "nearest partition" line once, and /sys is read once even
    when the load also times the whole model against the split (compare_whole)."""
    import handlers.runtime.assembly as assembly
    from handlers.artifact.manifest import load_verified_manifest
    from handlers.runtime.config import RuntimeConfig
    from handlers.runtime.perf_model import PerfHistory

    probes = []
    monkeypatch.setattr(assembly, "probe", lambda: probes.append(1) or probe())  # counts, then the real probe
    manifest = load_verified_manifest(tiny_model_dir)
    base = RuntimeConfig(core_groups="size:1", calibration_runs=1, head_devices="cpu", tail_devices="cpu",
                         state_dir=str(tmp_path))
    for config in (replace(base, ratio=0.7), replace(base, compare_whole=True)):
        probes.clear()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="handlers.artifact.manifest"):
            runtime = assembly.build_runtime(manifest, tiny_model_dir, config, PerfHistory())
        runtime.close()
        assert len(probes) == 1, config
        nearest = [r for r in caplog.records if "nearest partition" in r.getMessage()]
        assert len(nearest) == (1 if config.ratio == 0.7 else 0)
