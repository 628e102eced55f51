"""Many small models in one TorchServe on this box: how long until every one is READY, what each
idle model holds in memory, and what one busy model serves while the others sit idle vs alone.

Models: ``--models`` (default 20) archives named m00, m01, ..., cycling through the zoo's tiny
models (resnet18-tiny, googlenet-tiny, vit-tiny, nfnet-tiny; each exported and cut once, then
copied under each name), every one with the shipped model-config (``minWorkers/maxWorkers:
auto``: 2 workers each on a 2-core box, batchSize 4) and the shipped config.properties (CPU
launcher on). Each run starts from an empty performance history (``HETSERVE_STATE_DIR`` is a
fresh directory), so every worker calibrates, as on a first deployment.

Measured, in order:

1. READY: seconds from starting TorchServe until each model's workers all report READY
   (management API, polled every 0.5 s), and until the last one does (goal: <= 180 s).
2. Idle: for ``--idle-s`` seconds with no request, the CPU time every process of the server
   used (the Java frontend; per model its workers, their CPU launchers and connection guards),
   as a share of one core.
3. Memory per idle model: RSS, PSS and USS (psutil) of each model's processes, split into the
   worker itself, its CPU launcher (``torch.backends.xeon.run_cpu``, which TorchServe keeps
   alive as the worker's parent) and its connection guard.
4. Busy: ``--clients`` closed-loop clients on m00 (raw float32 tensors) for ``--duration``
   seconds after ``--warmup`` seconds, with the other models idle; then the same on a fresh
   TorchServe serving m00 alone (goal: >= 0.9x of alone).

How the cores are shared. With ``cpu_launcher_enable`` TorchServe starts worker i of a model's n
under ``run_cpu --ninstances n --rank i``, which pins it to the i-th share of the cores: with two
workers per model on two cores, every model's first worker shares core 0 and every second worker
core 1. Nothing reserves a core for a model; the kernel runs whichever workers have work. An
idle worker has none: its main thread blocks in recv() on the frontend's socket, its executor
threads on their job queues, ONNX Runtime's intra-op threads do not spin (``spinning: false``),
the decode pool's threads wait on their queue, the runtime's supervisor sleeps until a stage run
is submitted (it used to wake every 50 ms: 40 workers made 800 wake-ups a second), the
connection guard blocks in read(). The one poller left is the CPU launcher itself: it stays
alive as the worker's parent, waiting through torch.distributed.elastic's ``PContext.wait``,
which checks its child once a second (step 2 reports what that costs). So one busy model gets
both cores; what the idle models cost is memory (step 3: the launcher, a Python process that
imported torch, holds about as much as the worker) and the box's time to start them (step 1:
each worker and each launcher imports torch).

    python benchmarks/many_models.py                                   # 20 models, ~8-10 min
    python benchmarks/many_models.py --models 3 --idle-s 3 --duration 3 --warmup 2 --quick
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))  # this checkout's hetserve and handlers

from hetserve.benchmarking.harness import Load, hetserve_archive  # noqa: E402
from hetserve.loadgen import Target, run_closed_loop  # noqa: E402
from hetserve.machine import machine_info  # noqa: E402
from hetserve.tsprocess import TorchServe, start_torchserve  # noqa: E402

KINDS = ("resnet18-tiny", "googlenet-tiny", "vit-tiny", "nfnet-tiny")
READY_GOAL_S = 180.0
BUSY_GOAL = 0.9
LAUNCHER = "run_cpu"
GUARD_MARK = "os.read(fd"  # a line of the connection guard's script (handlers/connection_guard.py)


# ---- archives --------------------------------------------------------------------------------


def model_names(count: int) -> list[str]:
    return [f"m{i:02d}" for i in range(count)]


def named_copy(src: Path, dst: Path, name: str) -> Path:
    """``src`` with its model called ``name`` in both manifests (TorchServe's and hetserve's),
    as ``hetserve archive --model-name name`` would have written it; nothing else changes."""
    from handlers.artifact.manifest import MANIFEST_NAME

    renames = {MANIFEST_NAME: ("model_name",), "MAR-INF/MANIFEST.json": ("model", "modelName")}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename in renames:
                document = json.loads(data)
                node = document
                *parents, leaf = renames[item.filename]
                for key in parents:
                    node = node[key]
                node[leaf] = name
                data = (json.dumps(document, indent=2) + "\n").encode()
            zout.writestr(item, data)
    return dst


def build_store(store: Path, count: int) -> dict[str, str]:
    """name -> .mar file in ``store``: ``count`` copies cycling through the tiny zoo models."""
    store.mkdir(parents=True, exist_ok=True)
    bases = {}
    for kind in KINDS[: min(count, len(KINDS))]:
        bases[kind] = hetserve_archive(store, f"base_{kind.replace('-', '_')}", f"zoo:{kind}",
                                       "--ratios", "0.5", "--allow-off-target", "--cost", "flops")
    models = {}
    for i, name in enumerate(model_names(count)):
        named_copy(bases[KINDS[i % len(KINDS)]], store / f"{name}.mar", name)
        models[name] = f"{name}.mar"
    return models


def tensor_load(mar: Path) -> Load:
    """One raw float32 sample for the archive's single input."""
    from handlers.artifact.contract import read_archive

    (spec,) = read_archive(mar).manifest.inputs
    shape = [1, *(d if isinstance(d, int) else 1 for d in spec.shape[1:])]
    body = np.random.default_rng(0).standard_normal(shape, dtype=np.float32).tobytes()
    return Load.tensor(body, shape)


# ---- the server's processes ------------------------------------------------------------------


@dataclass(frozen=True)
class Processes:
    """pids of one model's processes, by role."""

    workers: tuple[int, ...]
    launchers: tuple[int, ...]
    guards: tuple[int, ...]


def model_processes(ts: TorchServe, name: str) -> Processes:
    import psutil

    resp = ts.request("GET", f"/models/{name}", api="management", timeout=10)
    workers = [w["pid"] for w in resp.json()[0].get("workers", []) if isinstance(w.get("pid"), int)]
    launchers, guards = [], []
    for pid in workers:
        try:
            process = psutil.Process(pid)
            parent = process.parent()
            if parent is not None and any(LAUNCHER in part for part in parent.cmdline()):
                launchers.append(parent.pid)
            guards += [c.pid for c in process.children() if any(GUARD_MARK in p for p in c.cmdline())]
        except psutil.Error:
            continue
    return Processes(tuple(p for p in workers if p > 1), tuple(launchers), tuple(guards))


def memory_mb(pids: tuple[int, ...]) -> dict[str, float]:
    """Summed RSS, PSS and USS in MB (PSS charges each shared page to its sharers in part)."""
    import psutil

    total = {"rss": 0.0, "pss": 0.0, "uss": 0.0}
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        for key in total:
            total[key] += getattr(info, key) / 2**20
    return {k: round(v, 1) for k, v in total.items()}


def cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def idle_cpu(ts: TorchServe, per_model: dict[str, Processes], seconds: float) -> dict[str, Any]:
    """Share of one core each kind of process used while nothing was sent."""
    groups = {
        "frontend": [ts.process.pid],
        "workers": [p for m in per_model.values() for p in m.workers],
        "launchers": [p for m in per_model.values() for p in m.launchers],
        "guards": [p for m in per_model.values() for p in m.guards],
    }
    before = {k: cpu_seconds(v) for k, v in groups.items()}
    started = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - started
    used = {k: cpu_seconds(v) - before[k] for k, v in groups.items()}
    shares = {f"{k}_core_share": round(v / wall, 4) for k, v in used.items()}
    return {"seconds": round(wall, 1), **shares,
            "per_idle_worker_core_share": round(used["workers"] / wall / max(len(groups["workers"]), 1), 5)}


# ---- READY --------------------------------------------------------------------------------------


class ReadyWatch:
    """Polls each model's workers from the moment the server's config and keys exist, and
    records when each model first had every worker READY (seconds since ``started``)."""

    def __init__(self, workdir: Path, models: list[str], started: float) -> None:
        self.workdir, self.models, self.started = workdir, models, started
        self.ready_s: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ReadyWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        import http.client

        port, key = None, None
        while not self._stop.wait(0.5) and len(self.ready_s) < len(self.models):
            try:
                if port is None:
                    port = _management_port(self.workdir / "config.properties")
                if key is None:
                    key = json.loads((self.workdir / "key_file.json").read_text())["management"]["key"]
            except (OSError, ValueError, KeyError):
                continue
            for name in self.models:
                if name in self.ready_s:
                    continue
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    conn.request("GET", f"/models/{name}", headers={"Authorization": f"Bearer {key}"})
                    resp = conn.getresponse()
                    body = resp.read()
                    conn.close()
                except OSError:
                    continue
                if resp.status != 200:
                    continue
                workers = json.loads(body)[0].get("workers", [])
                if workers and all(w.get("status") == "READY" for w in workers):
                    self.ready_s[name] = round(time.monotonic() - self.started, 1)


def _management_port(config: Path) -> int:
    for line in config.read_text().splitlines():
        if line.startswith("management_address="):
            return int(line.rsplit(":", 1)[1])
    raise ValueError("no management_address yet")


# ---- one busy model -----------------------------------------------------------------------------


def busy_rate(ts: TorchServe, name: str, load: Load, clients: int, warmup: float, duration: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {ts.keys['inference']}", **load.headers}
    target = Target.create(f"http://127.0.0.1:{ts.ports['inference']}/predictions/{name}",
                           load.bodies, headers, load.content_type)
    result = run_closed_loop(target, clients, duration, warmup=warmup)
    return {"clients": clients, "duration_s": duration, "warmup_s": warmup,
            "throughput_rps": round(result.goodput_rps, 2), "error_rate": result.error_rate,
            "p50_ms": result.latency_ms.p50, "p99_ms": result.latency_ms.p99}


# ---- the run ----------------------------------------------------------------------------------------


def serve_many(args: argparse.Namespace, store: Path, models: dict[str, str], load: Load) -> dict[str, Any]:
    workdir = args.work / "ts-many"
    state = Path(tempfile.mkdtemp(prefix="state-", dir=args.work))
    started = time.monotonic()
    with ReadyWatch(workdir.resolve(), list(models), started) as watch:
        ts = start_torchserve(workdir, store, models, timeout=args.ready_timeout,
                              env={"HETSERVE_STATE_DIR": str(state)})
        all_ready = round(time.monotonic() - started, 1)
    # start_torchserve saw them all READY: any the watch had not polled yet were READY by then.
    ready_s = {name: watch.ready_s.get(name, all_ready) for name in models}
    try:
        per_model = {name: model_processes(ts, name) for name in models}
        idle = idle_cpu(ts, per_model, args.idle_s)
        memory = {name: {role: memory_mb(getattr(p, role)) for role in ("workers", "launchers", "guards")}
                  for name, p in per_model.items()}
        frontend = memory_mb((ts.process.pid,))
        busy = busy_rate(ts, "m00", load, args.clients, args.warmup, args.duration)
    finally:
        ts.stop()
    return {"models": len(models), "workers": sum(len(p.workers) for p in per_model.values()),
            "ready": {"all_ready_s": all_ready, "goal_s": READY_GOAL_S, "per_model_s": ready_s},
            "idle_cpu": idle, "memory_mb": {"frontend": frontend, "per_model": memory,
                                            "mean_per_model": _mean_memory(memory)},
            "busy_m00": busy}


def serve_alone(args: argparse.Namespace, store: Path, load: Load) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="state-", dir=args.work))
    ts = start_torchserve(args.work / "ts-alone", store, {"m00": "m00.mar"}, timeout=args.ready_timeout,
                          env={"HETSERVE_STATE_DIR": str(state)})
    try:
        return busy_rate(ts, "m00", load, args.clients, args.warmup, args.duration)
    finally:
        ts.stop()


def _mean_memory(memory: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    roles = ("workers", "launchers", "guards")
    out = {r: {k: round(float(np.mean([m[r][k] for m in memory.values()])), 1) for k in ("rss", "pss", "uss")}
           for r in roles}
    out["all"] = {k: round(sum(out[r][k] for r in roles), 1) for k in ("rss", "pss", "uss")}
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = report["many"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ready = sorted(many["ready"]["per_model_s"].values())
    axes[0].step(ready, range(1, len(ready) + 1), where="post")
    axes[0].axvline(READY_GOAL_S, color="red", linestyle="--", label=f"goal {READY_GOAL_S:.0f} s")
    axes[0].set(xlabel="seconds since TorchServe started", ylabel="models READY",
                title=f"{many['models']} models, {many['workers']} workers: READY")
    axes[0].legend()
    mean = many["memory_mb"]["mean_per_model"]
    roles = ("workers", "launchers", "guards")
    for i, kind in enumerate(("rss", "pss", "uss")):
        bottom = 0.0
        for j, role in enumerate(roles):
            axes[1].bar(i, mean[role][kind], bottom=bottom, color=f"C{j}", label=role if i == 0 else None)
            bottom += mean[role][kind]
    axes[1].set_xticks(range(3), ["RSS", "PSS", "USS"])
    axes[1].set(ylabel="MB per idle model", title="memory per idle model (mean)")
    axes[1].legend()
    rates = [report["alone"]["throughput_rps"], many["busy_m00"]["throughput_rps"]]
    axes[2].bar(["m00 alone", f"m00 + {many['models'] - 1} idle"], rates, color=["C0", "C1"])
    axes[2].axhline(BUSY_GOAL * rates[0], color="red", linestyle="--", label=f"goal {BUSY_GOAL}x alone")
    axes[2].set(ylabel="requests/s", title=f"one busy model, {many['busy_m00']['clients']} closed-loop clients")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=20)
    p.add_argument("--idle-s", type=float, default=20.0, help="seconds of no traffic for the idle CPU")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--quick", action="store_true", help="smoke run: results go to *_quick files")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hetserve-many-models")
    p.add_argument("--out", type=Path, default=BENCHMARKS / "results")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.work / "store"
    models = build_store(store, args.models)
    load = tensor_load(store / "m00.mar")
    report: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]),
                              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(),
                              "kinds": [KINDS[i % len(KINDS)] for i in range(args.models)]}
    print(f"  {args.models} models in one TorchServe", flush=True)
    report["many"] = serve_many(args, store, models, load)
    print("  m00 alone", flush=True)
    report["alone"] = serve_alone(args, store, load)
    ratio = report["many"]["busy_m00"]["throughput_rps"] / max(report["alone"]["throughput_rps"], 1e-9)
    ready = report["many"]["ready"]["all_ready_s"]
    report["summary"] = {
        "all_ready_s": ready, "ready_goal_met": ready <= READY_GOAL_S,
        "memory_per_idle_model_mb": report["many"]["memory_mb"]["mean_per_model"]["all"],
        "idle_cpu_core_share": round(sum(v for k, v in report["many"]["idle_cpu"].items()
                                         if k.endswith("_core_share") and not k.startswith("per_")), 4),
        "busy_vs_alone": round(ratio, 3), "busy_goal_met": ratio >= BUSY_GOAL,
    }
    stem = "many_models_quick" if args.quick else "many_models"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out / f"{stem}.png")
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {args.out / stem}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
