"""GPU proof (issue 6): GPU-head + CPU-tail serving against GPU-only, every row in one run.

Rows, per model, all through the same in-process front end (below):
  a_gpu_whole_1stream   whole model, one CUDA stream
  b_gpu_whole_Nstreams  whole model, N CUDA streams (2 and 4)
  c_hetero_dmda         partitioned: head on the streams, each tail placed by the EWMA/dmda
                        scheduler over the streams and the CPU core groups (c1: one stream,
                        whole batches; c2: one stream, three micro-batches a batch)
  d_hetero_tail_cpu     partitioned: tail always on the CPU core groups
  e_torch_eager_gpu     the stock handler's work: eager PyTorch on the GPU, same front end

The front end stands in for TorchServe's: Poisson arrivals at a fixed rate (open loop, latency
from the intended send time), a batch aggregator with ``batchSize``/``maxBatchDelay`` and one
worker that hands each batch of raw-tensor requests to ``InferenceService.handle``, the very
method the TorchServe handler delegates to. TorchServe's own frontend is not in the loop: the
GPU machine has no Java. Knees use ``hetserve.knee`` with the p99 target given.

    python benchmarks/gpu_serving.py --models googlenet,nfnet --out benchmarks/results
    python benchmarks/gpu_serving.py --models googlenet-tiny --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from handlers.artifact.contract import read_archive  # noqa: E402
from hetserve.knee import Criteria, plot_curves, sweep_rates  # noqa: E402
from hetserve.loadgen import LoadResult, Record, arrival_offsets, summarize  # noqa: E402
from hetserve.machine import machine_info, run_record  # noqa: E402


def hetserve_rows(streams: list[int], ratio: float, groups: str,
                  batch: int = 8) -> dict[str, dict[str, Any]]:
    rows = {}
    for n in streams:
        rows[f"a_gpu_whole_{n}stream" if n == 1 else f"b_gpu_whole_{n}streams"] = {
            "ratio": 1.0, "cuda_streams": n, "head_devices": "cuda", "micro_batch": 0,
        }
    common = {"ratio": ratio, "cuda_streams": 2, "head_devices": "cuda", "core_groups": groups,
              "micro_batch": 2}
    rows["c_hetero_dmda"] = {**common, "tail_devices": "auto"}
    # One stream, the whole batch as one micro-batch: what row a runs, plus the cut.
    rows["c1_hetero_dmda_1stream"] = {**common, "cuda_streams": 1, "micro_batch": 0,
                                      "tail_devices": "auto"}
    # One stream, each batch in three micro-batches: the tail of one can run on the CPU while
    # the GPU runs the next one's head, inside the batch (a worker runs one batch at a time).
    rows["c2_hetero_dmda_3micro"] = {**common, "cuda_streams": 1, "micro_batch": -(-batch // 3),
                                     "tail_devices": "auto"}
    rows["d_hetero_tail_cpu"] = {**common, "tail_devices": "cpu"}
    return rows


# ------------------------------------------------------------------------- the model directory


def build_model_dir(model: str, ratio: float, batch: int, work: Path, device: str = "cuda") -> Path:
    """Export, profile on ``device``, cut and verify: the payload a .mar would carry."""
    from hetserve.cli import main as cli

    out = work / (model if ratio == 0.9 else f"{model}-r{ratio:g}")  # 0.9: the dirs of earlier runs
    if (out / "hetserve-manifest.json").exists():
        return out
    started = time.perf_counter()
    code = cli([
        "partition", "--model", f"zoo:{model}", "--ratios", str(ratio), "--method", "metis",
        "--profile-device", device, "--profile-batch", str(batch), "--quiet",
        "--out-dir", str(out), "--report", str(work / f"{out.name}-partition.json"),
    ])
    if code != 0:
        raise SystemExit(f"partition of {model} failed ({code})")
    print(f"[{model}] stages built in {time.perf_counter() - started:.0f} s", flush=True)
    return out


# ---------------------------------------------------------------------------------- front end


class FrontEnd:
    """Batch aggregator + workers: TorchServe's batching, without its frontend.

    One thread per handler, as TorchServe has one process per worker: a free worker takes the
    next batch from the shared queue, so with several workers several batches are in flight
    (TorchServe's synchronous worker protocol allows nothing else across batches).
    """

    def __init__(self, handle_batch, batch_size: int, max_delay_s: float) -> None:
        # list[bytes] -> list[int] (status per request); a list of them: one per worker
        self.handlers = list(handle_batch) if isinstance(handle_batch, list | tuple) else [handle_batch]
        self.batch_size = batch_size
        self.max_delay_s = max_delay_s
        self.inbox: queue.Queue = queue.Queue()
        self.batches = Counter()
        self.handle_ms: list[float] = []  # service time of each batch: the rest is queueing
        self._lock = threading.Lock()
        self._stop = False
        self._workers = [
            threading.Thread(target=self._loop, args=(handle,), name=f"frontend-w{i}", daemon=True)
            for i, handle in enumerate(self.handlers)
        ]
        for worker in self._workers:
            worker.start()

    def submit(self, body: bytes, done) -> None:
        self.inbox.put((body, done))

    def _loop(self, handle_batch) -> None:
        while not self._stop:
            try:
                first = self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.perf_counter() + self.max_delay_s
            while len(batch) < self.batch_size:
                left = deadline - time.perf_counter()
                try:
                    batch.append(self.inbox.get(timeout=max(left, 0)) if left > 0
                                 else self.inbox.get_nowait())
                except queue.Empty:
                    break
            with self._lock:
                self.batches[len(batch)] += 1
            started = time.perf_counter()
            try:
                statuses = handle_batch([b for b, _ in batch])
            except Exception as exc:  # noqa: BLE001 - count it as a 503 for every request
                print(f"batch failed: {exc!r}", flush=True)
                statuses = [503] * len(batch)
            now = time.perf_counter()
            self.handle_ms.append((now - started) * 1e3)
            for (_, done), status in zip(batch, statuses, strict=True):
                done(status, now)

    def close(self) -> None:
        self._stop = True
        for worker in self._workers:
            worker.join(timeout=5)


def run_open_loop(front: FrontEnd, body: bytes, rate: float, duration: float, warmup: float,
                  seed: int, drain_s: float = 10.0) -> LoadResult:
    offsets = arrival_offsets(rate, warmup + duration, "poisson", seed=seed)
    records: list[Record | None] = [None] * len(offsets)
    finished = threading.Semaphore(0)
    start = time.perf_counter() + 0.05

    sent: list[float] = [0.0] * len(offsets)

    def completer(i: int, intended: float):
        def done(status: int, now: float) -> None:
            records[i] = Record(intended, sent[i], now, status)
            finished.release()
        return done

    for i, offset in enumerate(offsets):
        intended = start + offset
        delay = intended - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent[i] = time.perf_counter()
        front.submit(body, completer(i, intended))
    deadline = time.perf_counter() + drain_s
    for _ in offsets:
        if not finished.acquire(timeout=max(0.0, deadline - time.perf_counter())):
            break
    now = time.perf_counter()
    final = [r if r is not None else Record(start + offsets[i], start + offsets[i], now, "timeout")
             for i, r in enumerate(records)]
    result = summarize(final, start + warmup, start + warmup + duration, mode="open",
                       target_rate=rate, arrival="poisson", warmup_s=warmup)
    # A backlog left behind must not slow the next point down.
    while not front.inbox.empty() or any(r is None for r in records):
        if time.perf_counter() > deadline + 30:
            break
        time.sleep(0.05)
    return result


# -------------------------------------------------------------------------------- the runners


def hetserve_handler(model_dir: Path, knobs: dict[str, Any], batch: int, delay_ms: int,
                     sample: tuple[int, ...]):
    from handlers.service import InferenceService, RawRequest

    yaml = {"batchSize": batch, "maxBatchDelay": delay_ms, "responseTimeout": 60,
            "hetserve": {"calibration_runs": 5, "state_dir": str(model_dir.parent / "state"),
                         **knobs}}
    # The state dir must lie under an allowed root (handlers/state_dir.py): allow this run's.
    os.environ["HETSERVE_STATE_ROOTS"] = str(model_dir.parent)
    service = InferenceService.load(model_dir, yaml)
    headers = {"X-Tensor-Shape": ",".join(str(d) for d in (1, *sample))}

    def handle(bodies: list[bytes]) -> list[int]:
        replies = service.handle([RawRequest(b, "application/octet-stream", headers) for b in bodies])
        return [r.status for r in replies]

    return service, handle


def hetserve_workers(model_dir: Path, knobs: dict[str, Any], batch: int, delay_ms: int,
                     sample: tuple[int, ...], workers: int):
    """``workers`` services, each loaded on its own slice of this process's cores, as TorchServe's
    CPU launcher gives each worker process its share: the probe sees the slice, and the executor
    threads inherit it. Returns (services, handles)."""
    if workers == 1:
        service, handle = hetserve_handler(model_dir, knobs, batch, delay_ms, sample)
        return [service], [handle]
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        raise SystemExit(f"{workers} workers need at least as many cores ({len(cores)} here)")
    loaded: list[Any] = [None] * workers

    def load(i: int) -> None:
        share = cores[i * len(cores) // workers:(i + 1) * len(cores) // workers]
        os.sched_setaffinity(0, share)
        try:
            loaded[i] = hetserve_handler(model_dir, knobs, batch, delay_ms, sample)
        except Exception as exc:  # noqa: BLE001 - reported below, after every loader ended
            loaded[i] = exc

    threads = [threading.Thread(target=load, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [x for x in loaded if isinstance(x, Exception)]
    if failed:
        for x in loaded:
            if not isinstance(x, Exception):
                x[0].close()
        raise failed[0]
    return [x[0] for x in loaded], [x[1] for x in loaded]


def eager_handler(model: str, sample: tuple[int, ...], batch: int):
    import torch

    from partitioner.zoo import build

    module = build(model).module.to("cuda").eval()

    def handle(bodies: list[bytes]) -> list[int]:
        x = np.concatenate([np.frombuffer(b, np.float32).reshape(1, *sample) for b in bodies])
        with torch.inference_mode():
            y = module(torch.from_numpy(x).to("cuda", non_blocking=False))
            y.cpu().numpy()
        return [200] * len(bodies)

    for size in range(1, batch + 1):  # every batch size once: cuDNN autotune, allocations
        handle([np.zeros(sample, np.float32).tobytes()] * size)
    return handle


def tail_shares(stats: list) -> dict[str, Any]:
    placed, placements = Counter(), Counter()
    for one in stats:
        placements.update(one.placements)
    for (stage, executor), n in placements.items():
        if stage == "tail":
            placed["cpu" if executor.startswith("cpu") else "cuda"] += n
    total = sum(placed.values())
    return {"tails": total, "cpu_share": placed["cpu"] / total if total else None,
            "by_executor": {f"{s}@{e}": n for (s, e), n in sorted(placements.items())}}


def sweep_row(name: str, handle, args, sample: tuple[int, ...], seed: int,
              services=()) -> dict[str, Any]:
    front = FrontEnd(handle, args.batch, args.delay_ms / 1000.0)
    body = np.random.default_rng(seed).standard_normal(sample, dtype=np.float32).tobytes()
    shares: dict[float, Any] = {}
    service_ms: dict[float, Any] = {}

    def at_rate(rate: float) -> LoadResult:
        for service in services:
            service.drain_stats()
        front.handle_ms.clear()
        result = run_open_loop(front, body, rate, args.duration, args.warmup, seed)
        handle_ms = sorted(front.handle_ms)
        service_ms[rate] = {"batches": len(handle_ms),
                            "p50": handle_ms[len(handle_ms) // 2] if handle_ms else None,
                            "p99": handle_ms[int(len(handle_ms) * 0.99)] if handle_ms else None}
        if services:
            shares[rate] = tail_shares([service.drain_stats() for service in services])
        p99 = result.latency_all_ms.p99
        print(f"  {name:22s} {rate:8.0f}/s -> {result.throughput_rps:8.1f}/s  p50 "
              f"{result.latency_ms.p50 or 0:7.1f}  p99 {p99 or 0:7.1f} ms  errors {result.errors}"
              f"  batch ms p50 {service_ms[rate]['p50'] or 0:.1f} p99 {service_ms[rate]['p99'] or 0:.1f}"
              f" (n={service_ms[rate]['batches']}) lag p99 {result.send_lag_p99_ms or 0:.1f}"
              f"{'  cpu tails %.0f%%' % (100 * shares[rate]['cpu_share']) if shares.get(rate) and shares[rate]['cpu_share'] is not None else ''}",
              flush=True)
        return result

    criteria = Criteria(p99_ms=args.p99_ms)
    # Unmeasured: the first batches of a fresh session pay one-off costs (allocator growth,
    # lazy CUDA module loading) that belong to no rate.
    run_open_loop(front, body, args.start_rate, 1.0, 0.0, seed + 1000)
    try:
        sweep = sweep_rates(at_rate, args.start_rate, max_rate=args.max_rate, factor=args.factor,
                            stop_after_failures=1, refine_steps=args.refine, criteria=criteria)
    finally:
        front.close()
    return {"name": name, "knee_rate": sweep.knee_rate, "batches": dict(front.batches),
            "points": [json.loads(p.to_json()) for p in sweep.points],
            "tail_placement": {str(r): s for r, s in shares.items()},
            "batch_service_ms": {str(r): s for r, s in service_ms.items()}}


def bench_model(model: str, args, work: Path, partial: Path | None = None) -> dict[str, Any]:
    model_dir = build_model_dir(model, args.ratio, args.batch, work)
    manifest = read_archive(model_dir).manifest
    sample = tuple(manifest.inputs[0].sample_shape)
    rows = []
    wanted = hetserve_rows(args.streams, args.ratio, args.groups, args.batch)
    if args.rows:
        wanted = {n: k for n, k in wanted.items() if n.split("_")[0] in args.rows}
    for i, (name, knobs) in enumerate(wanted.items()):
        knobs = {**knobs, **args.knobs}
        if args.workers > 1:
            name = f"{name}_{args.workers}w"
        started = time.perf_counter()
        services, handles = hetserve_workers(model_dir, knobs, args.batch, args.delay_ms, sample,
                                             args.workers)
        try:
            print(f"[{model}] {name}: loaded in {time.perf_counter() - started:.1f} s", flush=True)
            row = sweep_row(name, handles, args, sample, seed=i, services=services)
            row["knobs"] = knobs
            row["workers"] = args.workers
            row["executors"] = [sorted(s.runtime.executors) for s in services]
            rows.append(row)
            if partial is not None:  # a run cut short by its time limit keeps what it measured
                partial.write_text(json.dumps({"model": model, "rows": rows}) + "\n")
        finally:
            for service in services:
                service.close()
    if not args.rows or "e" in args.rows:
        rows.append({**sweep_row("e_torch_eager_gpu", eager_handler(model, sample, args.batch), args, sample, seed=99),
                     "knobs": {"torch": "eager, inference_mode, fp32"}})
    best_gpu = max((r["knee_rate"] or 0 for r in rows if r["name"][0] in "ab"), default=0)
    for r in rows:
        r["vs_best_gpu_only"] = (r["knee_rate"] or 0) / best_gpu if best_gpu else None
    partitions = manifest.partitions
    return {"model": model, "partition": partitions[0].to_json() if partitions else None, "rows": rows}


def gpu_info() -> dict[str, Any]:
    import subprocess

    import onnxruntime as ort
    import torch

    query = "name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max"
    smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
    return {"nvidia_smi": smi, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "onnxruntime": ort.__version__, "ort_device": ort.get_device()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="googlenet,nfnet,vit-b16")
    parser.add_argument("--ratio", type=float, default=0.9, help="head share of the partitioned rows")
    parser.add_argument("--groups", default="size:4", help="CPU core-group policy for the tails")
    parser.add_argument("--streams", default="1,2,4")
    parser.add_argument("--batch", type=int, default=8, help="batchSize (the paper uses 8-27)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker threads, each with its own service on its share of the cores")
    parser.add_argument("--delay-ms", type=int, default=5, help="maxBatchDelay")
    parser.add_argument("--p99-ms", type=float, default=100.0)
    parser.add_argument("--start-rate", type=float, default=100.0)
    parser.add_argument("--max-rate", type=float, default=6000.0)
    parser.add_argument("--factor", type=float, default=1.5)
    parser.add_argument("--refine", type=int, default=2)
    parser.add_argument("--duration", type=float, default=2.5)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hetserve-gpu"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--rows", default="", help="only these rows, by letter: e.g. a,c1,e")
    parser.add_argument("--quick", action="store_true", help="few short points (smoke test)")
    parser.add_argument("--knobs", type=json.loads, default={},
                        help='JSON merged into every hetserve row, e.g. {"cuda_graph": true}')
    args = parser.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    args.rows = {r.strip() for r in args.rows.split(",") if r.strip()}
    if args.quick:
        args.duration, args.warmup, args.refine, args.max_rate = 1.0, 0.2, 0, 400.0
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        stem = f"gpu-serving-{model}{args.tag}"
        result = {"benchmark": "gpu_serving", **run_record(), "machine": machine_info(),
                  "gpu": gpu_info(),
                  "settings": {k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
                               for k, v in vars(args).items()},
                  **bench_model(model, args, args.work, args.out / f"{stem}.partial.json")}
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / f"{stem}.partial.json").unlink(missing_ok=True)
        curves = {r["name"]: [LoadResult.from_json(json.dumps(p)) for p in r["points"]]
                  for r in result["rows"]}
        plot_curves(curves, args.out / f"{stem}.png", log_y=True, criteria=Criteria(p99_ms=args.p99_ms),
                    title=f"{model}, batchSize {args.batch}: latency vs offered rate")
        print(json.dumps({r["name"]: [r["knee_rate"], r["vs_best_gpu_only"]] for r in result["rows"]}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
