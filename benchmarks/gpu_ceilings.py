"""Yardsticks for issue 16's GPU rows: the device's rate, the frontend's rate, the host time a run.

  device    in-process ORT CUDA with IO binding at the served batch size, the whole model of each
            model directory: inputs and outputs resident on the GPU (plain and as a CUDA graph),
            and with the host->device and device->host copies of every batch. No server, no
            Python between runs but the loop: what the GPU does with this model.
  frontend  a real TorchServe with the no-work handler (``baseline/noop_handler.py``), the same
            request bodies, batchSize, maxBatchDelay and workers as the served rows: what the
            frontend carries. The served ceiling is the lower of the two.
  host      the time a batch costs in the handler with ``hetserve.cuda_graph`` off and on: one
            ``CudaExecutor`` job (and, from its timeline, the host time beside the GPU compute)
            and one ``InferenceService.handle`` of a whole batch of requests.

    python3 benchmarks/gpu_ceilings.py device --models googlenet,nfnet,vit-b16 --out $OUT
    python3 benchmarks/gpu_ceilings.py host --models googlenet --out $OUT
    python3 benchmarks/gpu_ceilings.py frontend --workers 1,4 --out $OUT
    python3 benchmarks/gpu_ceilings.py device --device cpu --models googlenet-tiny --out /tmp/x

``--device cpu`` runs the same code paths on the CPU provider (a smoke test, not a figure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from hetserve.machine import machine_info, run_record  # noqa: E402

IMAGE_SHAPE = (1, 3, 224, 224)  # the served models' request: 602,112 bytes of float32


def percentiles(samples: list[float]) -> dict[str, float | int | None]:
    if not samples:
        return {"n": 0, "median": None, "p90": None, "p99": None}
    ordered = sorted(samples)
    return {"n": len(ordered), "median": statistics.median(ordered),
            "p90": ordered[int(0.9 * (len(ordered) - 1))],
            "p99": ordered[int(0.99 * (len(ordered) - 1))]}


def model_dir_for(model: str, ratio: float, batch: int, work: Path, device: str) -> Path:
    """gpu_serving.py's model directory (built once a device session; the whole model is in it)."""
    from gpu_serving import build_model_dir

    return build_model_dir(model, ratio, batch, work, device)


def whole_model(model_dir: Path) -> tuple[Path, str, tuple[int, ...]]:
    manifest = json.loads((model_dir / "hetserve-manifest.json").read_text())
    spec = manifest["inputs"][0]
    return model_dir / manifest["whole_model"], spec["name"], tuple(spec["shape"][1:])


def timed_loop(step, seconds: float, warmup: int = 5) -> dict[str, float]:
    for _ in range(warmup):
        step()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        runs += 1
    elapsed = time.perf_counter() - started
    return {"runs": runs, "ms_per_run": 1e3 * elapsed / runs}


# ----------------------------------------------------------------------------------- device


def device_rows(path: Path, name: str, sample: tuple[int, ...], batch: int, seconds: float,
                device: str) -> dict[str, Any]:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *sample), dtype=np.float32)
    if device == "cpu":
        cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        row = timed_loop(lambda: cpu.run(None, {name: x}), seconds, warmup=1)
        return {"cpu_plain": {**row, "samples_per_s": batch * 1e3 / row["ms_per_run"]}}

    import torch

    rows: dict[str, Any] = {}
    for variant in ("resident", "resident_cuda_graph", "with_copies"):
        options = {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC"}
        if variant == "resident_cuda_graph":
            options["enable_cuda_graph"] = "1"
        try:
            session = ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", options)])
        except Exception as exc:  # noqa: BLE001 - a refused graph is a result, not a crash
            rows[variant] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            continue
        out = session.get_outputs()[0]
        x_dev = torch.from_numpy(x).to("cuda")
        y_shape = [batch if not isinstance(d, int) else d for d in out.shape]
        y_dev = torch.empty(y_shape, dtype=torch.float32, device="cuda")
        binding = session.io_binding()
        binding.bind_input(name, "cuda", 0, np.float32, list(x_dev.shape), x_dev.data_ptr())
        binding.bind_output(out.name, "cuda", 0, np.float32, y_shape, y_dev.data_ptr())
        if variant == "with_copies":
            host = (torch.from_numpy(x).pin_memory(),
                    torch.empty(y_shape, dtype=torch.float32).pin_memory())

            def step(s=session, b=binding, host=host, dev=(x_dev, y_dev)):
                dev[0].copy_(host[0], non_blocking=True)
                torch.cuda.synchronize()
                s.run_with_iobinding(b)
                host[1].copy_(dev[1])
        else:
            def step(s=session, b=binding):
                s.run_with_iobinding(b)
        row = timed_loop(step, seconds)
        rows[variant] = {**row, "samples_per_s": batch * 1e3 / row["ms_per_run"]}
    best = max((r.get("samples_per_s", 0) for r in rows.values()), default=0)
    rows["device_ceiling_samples_per_s"] = best
    return rows


# ------------------------------------------------------------------------------------- host


def host_rows(model_dir: Path, batch: int, runs: int, device: str) -> dict[str, Any]:
    from handlers.service import InferenceService, RawRequest

    path, name, sample = whole_model(model_dir)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *sample), dtype=np.float32)
    body = x[0].tobytes()
    headers = {"X-Tensor-Shape": ",".join(str(d) for d in (1, *sample))}
    rows: dict[str, Any] = {}
    for graph in (False, True):
        label = "graph_on" if graph else "graph_off"
        if device == "cuda":
            rows[f"executor_{label}"] = executor_host_time(path, name, x, batch, runs, graph)
        knobs = {"ratio": 1.0, "cuda_streams": 1, "micro_batch": 0, "cuda_graph": graph,
                 "head_devices": "cuda" if device == "cuda" else "cpu",
                 "tail_devices": "cuda" if device == "cuda" else "cpu",
                 "state_dir": str(model_dir.parent / f"state-host-{label}")}
        service = InferenceService.load(model_dir, {"batchSize": batch, "hetserve": knobs})
        try:
            requests = [RawRequest(body, "application/octet-stream", headers)] * batch
            for _ in range(5):
                service.handle(requests)
            samples = []
            for _ in range(runs):
                started = time.perf_counter()
                replies = service.handle(requests)
                samples.append((time.perf_counter() - started) * 1e3)
            bad = [r.status for r in replies if r.status != 200]
            rows[f"service_{label}"] = {"handle_ms": percentiles(samples), "errors": len(bad),
                                        "executors": sorted(service.runtime.executors)}
        finally:
            service.close()
    return rows


def executor_host_time(path: Path, name: str, x: np.ndarray, batch: int, runs: int,
                       graph: bool) -> dict[str, Any]:
    """One job at a time: its wall time, and from the timeline its GPU compute and the host
    thread's span; the host time beside the compute is what CUDA graphs should cut."""
    from handlers.executors.cuda import CudaExecutor, CudaGraphSession
    from handlers.observability.tracing import Timeline

    executor = CudaExecutor({"whole": path}, 0, 0, pad_batch=batch, cuda_graph=graph)
    executor.start(timeout=300)
    try:
        for _ in range(5):
            executor.submit("whole", {name: x}, batch).result(60)
        executor.timeline = timeline = Timeline()
        walls = []
        for _ in range(runs):
            started = time.perf_counter()
            executor.submit("whole", {name: x}, batch).result(60)
            walls.append((time.perf_counter() - started) * 1e3)
        lanes: dict[str, list[float]] = {}
        for span in timeline.spans():
            lanes.setdefault(span.lane.split("/")[-1], []).append(span.seconds * 1e3)
        compute, host = lanes.get("compute", []), lanes.get("host", [])
        beside = [h - c for h, c in zip(host, compute, strict=False)]
        session = executor.sessions["whole"]
        return {"job_ms": percentiles(walls), "compute_ms": percentiles(compute),
                "host_span_ms": percentiles(host), "host_beside_compute_ms": percentiles(beside),
                "as_graph": isinstance(session, CudaGraphSession),
                "graph_refusals": dict(executor.graph_refusals)}
    finally:
        executor.close()


# --------------------------------------------------------------------------------- frontend


def frontend_rows(args, workers: list[int]) -> dict[str, Any]:
    from gpu_baselines import build_noop_mar
    from serving_cpu import sweep_server

    from hetserve.knee import Criteria

    criteria = Criteria(p99_ms=args.p99_ms)
    store = args.work / "store-frontend"
    store.mkdir(parents=True, exist_ok=True)
    body = np.zeros(IMAGE_SHAPE, np.float32).tobytes()
    rows = {}
    for n in workers:
        serving = {"minWorkers": n, "maxWorkers": n, "batchSize": args.batch,
                   "maxBatchDelay": args.delay_ms, "responseTimeout": 60}
        mar = build_noop_mar(store, serving, tag=f"_{n}w")
        print(f"== frontend ceiling, {n} worker(s)", flush=True)
        sweep = sweep_server(store, mar.name, args.work / f"ts-noop-{n}w", body, args, criteria,
                             shape=IMAGE_SHAPE)
        rows[f"noop_{n}w"] = {**json.loads(sweep.to_json()), "config": serving}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("device", "host", "frontend"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--models", default="googlenet,nfnet,vit-b16")
    parser.add_argument("--batch", type=int, default=8, help="the served batchSize")
    parser.add_argument("--ratio", type=float, default=0.9,
                        help="the cut of the model directory to reuse (its whole model is timed)")
    parser.add_argument("--seconds", type=float, default=3.0, help="device: timed seconds a row")
    parser.add_argument("--runs", type=int, default=200, help="host: timed batches a row")
    parser.add_argument("--workers", default="1,4", help="frontend: TorchServe workers")
    parser.add_argument("--delay-ms", type=int, default=5, help="frontend: maxBatchDelay")
    parser.add_argument("--p99-ms", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=2.0, help="frontend: seconds a rate")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--jvm-warmup", type=float, default=5.0)
    parser.add_argument("--start-rate", type=float, default=400.0)
    parser.add_argument("--factor", type=float, default=1.5)
    parser.add_argument("--max-rate", type=float, default=20000.0)
    parser.add_argument("--refine", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None,
                        help="model directories (default: gpu_serving.py's, shared)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    default_work = "/tmp/hetserve-gpu" if args.device == "cuda" else f"{tempfile.gettempdir()}/hetserve-ceil-cpu"
    args.work = args.work or Path(default_work)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "benchmark": f"gpu_ceilings_{args.what}", **run_record(), "machine": machine_info(),
        "device": args.device,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": {},
    }
    if args.what == "frontend":
        record["rows"] = frontend_rows(args, [int(w) for w in args.workers.split(",")])
    else:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            model_dir = model_dir_for(model, args.ratio, args.batch, args.work, args.device)
            if args.what == "device":
                path, name, sample = whole_model(model_dir)
                record["rows"][model] = device_rows(path, name, sample, args.batch, args.seconds,
                                                    args.device)
            else:
                record["rows"][model] = host_rows(model_dir, args.batch, args.runs, args.device)
            print(json.dumps({model: record["rows"][model]}, indent=1, default=str), flush=True)
    out = args.out / f"gpu-ceiling-{args.what}{args.tag}.json"
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
