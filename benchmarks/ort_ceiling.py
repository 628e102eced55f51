"""How fast this machine runs a model in process (ONNX Runtime, no server): the yardstick that makes
serving figures from different days comparable. Shared build machines vary from day to day.

    .venv/bin/python benchmarks/ort_ceiling.py --mar /tmp/hetserve-bench/store/resnet18.mar
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from handlers.artifact.contract import read_archive  # noqa: E402
from hetserve.machine import machine_info, run_record  # noqa: E402


def samples_per_s(path: Path, threads: int, batch: int, seconds: float) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal((batch, *spec.shape[1:]), dtype=np.float32)
    for _ in range(3):
        session.run(None, {spec.name: x})
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, {spec.name: x})
        done += batch
    return done / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mar", type=Path, required=True, help="a hetserve .mar (its whole model is timed)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ort_ceiling.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(args.mar) as archive:
            archive.extractall(tmp)
        manifest = read_archive(Path(tmp)).manifest
        whole = Path(tmp) / manifest.whole_model
        rows = [{"threads": t, "batch": b, "samples_per_s": round(samples_per_s(whole, t, b, args.seconds), 1)}
                for t in (1, 2) for b in (1, 8)]
    result = {**run_record(), "machine": machine_info(), "model": manifest.model_name, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
