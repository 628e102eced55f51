"""Where a GPU batch's time goes: each layer of the serving path timed alone, batch by batch.

Layers, innermost first: a plain ORT CUDA session (ORT copies in and out; cuDNN's exhaustive
and heuristic conv search), one ``CudaExecutor`` job (IO binding on its own stream, pinned
staging), ``Runtime.run`` and ``InferenceService.handle`` (decode, validate, encode), next to
eager PyTorch on the GPU. A gap between two layers is that layer's
overhead.

    python benchmarks/gpu_stage_timing.py --model-dir /tmp/hetserve-gpu/googlenet --out gpu-timing.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def timed(fn, runs: int) -> dict[str, float]:
    fn()
    fn()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--zoo", default=None, help="zoo name for the eager row (default: none)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import onnxruntime as ort

    from handlers.artifact.contract import read_archive
    from handlers.executors.cuda import CudaExecutor
    from handlers.service import InferenceService, RawRequest

    manifest = read_archive(args.model_dir).manifest
    sample = tuple(manifest.inputs[0].sample_shape)
    whole = args.model_dir / manifest.whole_model
    name = manifest.inputs[0].name
    rows: dict[str, dict] = {}
    rng = np.random.default_rng(0)
    batches = [int(b) for b in args.batches.split(",")]

    for search in ("EXHAUSTIVE", "HEURISTIC"):
        session = ort.InferenceSession(str(whole), providers=[
            ("CUDAExecutionProvider", {"cudnn_conv_algo_search": search})])
        for b in batches:
            x = rng.standard_normal((b, *sample), dtype=np.float32)
            first = time.perf_counter()
            session.run(None, {name: x})
            rows[f"ort_plain_{search.lower()}_b{b}"] = {
                "first_run_ms": (time.perf_counter() - first) * 1e3,
                **timed(lambda s=session, x=x: s.run(None, {name: x}), args.runs)}
        del session

    executor = CudaExecutor({"whole": whole}, 0, 0)
    executor.start(timeout=120)
    for b in batches:
        x = rng.standard_normal((b, *sample), dtype=np.float32)
        rows[f"cuda_executor_b{b}"] = timed(
            lambda x=x, b=b: executor.submit("whole", {name: x}, b).result(60), args.runs)
    executor.close()

    for label, knobs in (("whole_1stream", {"ratio": 1.0, "cuda_streams": 1}),
                         ("hetero_0.9", {"ratio": 0.9, "cuda_streams": 2, "micro_batch": 2})):
        os.environ.setdefault("HETSERVE_STATE_ROOTS", "/tmp/hetserve-timing")  # an allowed root
        service = InferenceService.load(args.model_dir, {
            "batchSize": max(batches), "hetserve": {"head_devices": "cuda", **knobs,
                                                    "state_dir": "/tmp/hetserve-timing"}})
        headers = {"X-Tensor-Shape": ",".join(str(d) for d in (1, *sample))}
        body = rng.standard_normal(sample, dtype=np.float32).tobytes()
        for b in batches:
            requests = [RawRequest(body, "application/octet-stream", headers)] * b
            x = np.concatenate([np.frombuffer(body, np.float32).reshape(1, *sample)] * b)
            rows[f"runtime_{label}_b{b}"] = timed(lambda x=x, s=service: s.runtime.run({name: x}),
                                                  args.runs)
            rows[f"service_{label}_b{b}"] = timed(lambda r=requests, s=service: s.handle(r),
                                                  args.runs)
        rows[f"placements_{label}"] = {f"{s}@{e}": n for (s, e), n in
                                       service.drain_stats().placements.items()}
        service.close()

    if args.zoo:
        import torch

        from partitioner.zoo import build

        module = build(args.zoo).module.to("cuda").eval()
        for b in batches:
            x = rng.standard_normal((b, *sample), dtype=np.float32)

            def eager(x=x):
                with torch.inference_mode():
                    module(torch.from_numpy(x).to("cuda")).cpu()
            rows[f"torch_eager_b{b}"] = timed(eager, args.runs)

    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    for key, row in rows.items():
        print(f"{key:40s} {row}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
