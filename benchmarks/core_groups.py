"""Core-grouping study (StarONNX Figs. 3-4) for whatever machine this runs on.

(1) Speedup vs cores: each stage (whole model, head, tail) on one ORT session whose intra-op
    threads are pinned to the first n physical cores (NUMA node by node), speedup = t(1) / t(n).
(2) Grouping: B batches over all the cores, split into groups by NUMA node, by socket, by K cores
    (each group one pinned session, the runtime's `CpuExecutor`), against ORT's default: the same
    number of sessions with K threads each, left for the OS to place ("ort_default:K").

    python benchmarks/core_groups.py                      # resnet18 and googlenet
    python benchmarks/core_groups.py --quick              # resnet18-tiny, short runs (~1 min)

Runs unchanged on a 2-core box and a 16-core GPU machine (core counts and group sizes come from
`handlers.hardware.topology.probe`). Writes benchmarks/results/core_groups.json and core_groups.png.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from handlers.artifact.contract import read_archive  # noqa: E402
from handlers.executors.cpu import CpuExecutor  # noqa: E402
from handlers.hardware.topology import CoreGroup, Topology, core_groups, probe  # noqa: E402
from hetserve.machine import machine_info, run_record  # noqa: E402


def build_archive(model: str, ratio: float, work: Path) -> Path:
    """Whole model + head/tail at `ratio`, unpacked; FLOP costs (the cut only has to be valid)."""
    from hetserve.cli import main

    name = f"{model.replace('-', '_')}_groups"
    folder = work / name
    if not (folder / "model.onnx").exists():
        store = work / "store"
        if not (store / f"{name}.mar").exists():
            code = main(["archive", "--model", f"zoo:{model}", "--model-name", name, "--export-path", str(store),
                         "--ratios", f"{ratio}", "--cost", "flops", "--quiet", "--force"])
            if code != 0:
                raise SystemExit(f"archiving {model} failed")
        with zipfile.ZipFile(store / f"{name}.mar") as z:
            z.extractall(folder)
    return folder


def stage_files(folder: Path) -> dict[str, Path]:
    manifest = read_archive(folder).manifest
    files = {"whole": folder / manifest.whole_model}
    if manifest.partitions:
        part = manifest.partitions[0]
        files.update(head=folder / part.head, tail=folder / part.tail)
    return files


def feeds_for(path: Path, batch: int) -> dict[str, np.ndarray]:
    """Random inputs for a stage, batch dimension first (dynamic dims other than batch: 1)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    out = {}
    for spec in session.get_inputs():
        shape = [batch] + [d if isinstance(d, int) else 1 for d in spec.shape[1:]]
        out[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def time_stage(group: CoreGroup, stage: str, path: Path, feeds, batch: int, seconds: float) -> float:
    """Median seconds per run of `stage` on a pinned session over `group`."""
    executor = CpuExecutor(group, {stage: path})
    executor.start()
    try:
        executor.submit(stage, feeds, batch, observe=False).result()  # first run allocates
        times, stop = [], time.perf_counter() + seconds
        while time.perf_counter() < stop or len(times) < 3:
            t0 = time.perf_counter()
            executor.submit(stage, feeds, batch).result()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        executor.close()


def first_cores(topo: Topology, n: int) -> CoreGroup:
    ordered = sorted(topo.cores, key=lambda c: (c.numa, c.socket, c.cpu))  # fill one node first
    return CoreGroup.of(ordered[:n])


def core_counts(total: int) -> list[int]:
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n < total]
    return [*counts, total]


def speedup_study(topo: Topology, files: dict[str, Path], batches: list[int], seconds: float) -> dict:
    out: dict = {}
    for stage, path in files.items():
        for batch in batches:
            feeds = feeds_for(path, batch)
            times = {n: time_stage(first_cores(topo, n), stage, path, feeds, batch, seconds)
                     for n in core_counts(len(topo.cores))}
            out[f"{stage} b{batch}"] = {
                "stage": stage, "batch": batch, "seconds": times,
                "speedup": {n: times[1] / t for n, t in times.items()},
            }
            print(f"  {stage:<5} batch {batch:>2}: " + ", ".join(
                f"{n} cores x{times[1] / t:.2f}" for n, t in times.items()), flush=True)
    return out


class _Session:
    """One group's session, driven from one thread. Pinned: the runtime's own session options
    (intra-op threads on the group's cores) with the calling thread on its first core, as
    `CpuExecutor` does. Unpinned: ORT's default, threads wherever the OS puts them. Both run
    straight from the draining thread, so the comparison is only about placement."""

    def __init__(self, path: Path, group: CoreGroup | None = None, threads: int = 1) -> None:
        import onnxruntime as ort

        from handlers.executors.cpu import cpu_session_options

        if group is not None:
            options = cpu_session_options(group, spinning=False)
        else:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.group = group
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def enter(self) -> None:
        if self.group is not None:
            os.sched_setaffinity(0, {self.group.cpus[0]})

    def run(self, feeds) -> None:
        self.session.run(None, feeds)


def grouping_policies(topo: Topology) -> dict[str, list[CoreGroup] | tuple[int, int]]:
    """name -> pinned groups, or (sessions, threads each) for ORT's unpinned default."""
    total = len(topo.cores)
    policies: dict = {"numa": core_groups(topo, "numa"), "socket": core_groups(topo, "socket")}
    for k in core_counts(total):
        policies[f"size:{k}"] = core_groups(topo, f"size:{k}")
        policies[f"ort_default:{k}"] = (max(1, total // k), k)
    return policies


def run_batches(workers: list[_Session], feeds, count: int) -> float:
    """Seconds for `count` batches pulled from one queue by every session's thread."""
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(count):
        jobs.put(1)
    for _ in workers:
        jobs.put(None)

    def drain(worker: _Session) -> None:
        worker.enter()
        while jobs.get() is not None:
            worker.run(feeds)

    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def grouping_study(topo: Topology, path: Path, batches: list[int], per_group: int) -> dict:
    out: dict = {}
    for name, policy in grouping_policies(topo).items():
        for batch in batches:
            feeds = feeds_for(path, batch)
            if isinstance(policy, tuple):
                sessions, threads = policy
                runners = [_Session(path, threads=threads) for _ in range(sessions)]
            else:
                runners = [_Session(path, group) for group in policy]
            count = per_group * len(runners)
            run_batches(runners, feeds, len(runners))  # warm every session
            seconds = run_batches(runners, feeds, count)
            groups = len(runners)
            out[f"{name} b{batch}"] = {"policy": name, "batch": batch, "groups": groups,
                                       "batches": count, "seconds": seconds,
                                       "samples_per_s": count * batch / seconds}
            print(f"  {name:<15} batch {batch:>2}: {groups} group(s), {count * batch / seconds:7.1f} samples/s",
                  flush=True)
    return out


def plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    models = list(results["models"])
    fig = Figure(figsize=(11, 4 * len(models)), layout="tight")
    axes = fig.subplots(len(models), 2, squeeze=False)
    for row, model in enumerate(models):
        entry = results["models"][model]
        ax = axes[row][0]
        for i, (label, s) in enumerate(entry["speedup"].items()):
            ns = [int(n) for n in s["speedup"]]
            ax.plot(ns, list(s["speedup"].values()), "-o", ms=3, color=f"C{i % 10}", label=label)
        top = max(int(n) for s in entry["speedup"].values() for n in s["speedup"])
        ax.plot([1, top], [1, top], ":", color="grey", label="ideal")
        ax.set_xlabel("cores (one pinned ORT session)")
        ax.set_ylabel("speedup vs 1 core")
        ax.set_title(f"{model}: speedup per stage (Fig. 3)")
        ax.legend(fontsize="x-small")
        ax.grid(alpha=0.3)
        ax = axes[row][1]
        grouping = entry["grouping"]
        policies = list(dict.fromkeys(g["policy"] for g in grouping.values()))
        batches = sorted({g["batch"] for g in grouping.values()})
        width = 0.8 / len(batches)
        for j, batch in enumerate(batches):
            values = [grouping[f"{p} b{batch}"]["samples_per_s"] for p in policies]
            ax.bar([i + j * width for i in range(len(policies))], values, width, label=f"batch {batch}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(policies))], policies, rotation=30, fontsize="small")
        ax.set_ylabel("samples/s (all cores)")
        ax.set_title(f"{model}: core groups vs ORT default (Fig. 4)")
        ax.legend(fontsize="x-small")
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,googlenet")
    p.add_argument("--ratio", type=float, default=0.8, help="head share of the cut whose stages are timed")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--seconds", type=float, default=2.0, help="timing per (stage, batch, cores) point")
    p.add_argument("--per-group", type=int, default=8, help="grouping study: batches per group")
    p.add_argument("--quick", action="store_true", help="resnet18-tiny, short timings (smoke run)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hetserve-core-groups")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()
    if args.quick:
        args.models, args.seconds, args.per_group = "resnet18-tiny", 0.3, 3
    batches = [int(b) for b in args.batches.split(",")]
    topo = probe()
    print(topo.describe(), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    results = {**run_record(), "machine": machine_info(), "topology": topo.describe(),
               "settings": {"ratio": args.ratio, "batches": batches, "seconds": args.seconds,
                            "per_group": args.per_group},
               "models": {}}
    for model in args.models.split(","):
        print(f"== {model}", flush=True)
        files = stage_files(build_archive(model, args.ratio, args.work))
        results["models"][model] = {
            "speedup": speedup_study(topo, files, batches, args.seconds),
            "grouping": grouping_study(topo, files["whole"], batches, args.per_group),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "core_groups_quick" if args.quick else "core_groups"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and .png; load average now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
