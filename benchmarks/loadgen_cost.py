"""CPU cost of hetserve's load generator: it shares the machine it measures, so it must be light.

Drives a trivial local HTTP server (threaded, instant 200) from the generator's CLI in its own
process, so the CPU figure is the generator's alone, at several rates and body sizes.

    python benchmarks/loadgen_cost.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hetserve.machine import machine_info, run_record  # noqa: E402


class Instant(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per row")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Instant)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/predictions/m"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, size in (("600 KB (1x3x224x224 float32)", 3 * 224 * 224 * 4), ("100 B", 100)):
            body = Path(tmp) / "body.bin"
            body.write_bytes(os.urandom(size))
            for rate in (50, 100, 200, 400):
                out = subprocess.run(
                    [sys.executable, "-m", "hetserve.loadgen", "--url", url, "--body-file", str(body),
                     "--rate", str(rate), "--duration", str(args.duration), "--warmup", "1"],
                    cwd=REPO, capture_output=True, text=True, check=True)
                r = json.loads(out.stdout)
                rows.append({"body": label, "rate": rate, "served_rps": round(r["throughput_rps"], 1),
                             "cpu_pct_of_one_core": round(r["cpu_pct"], 1),
                             "send_lag_p99_ms": r["send_lag_p99_ms"]})
                print(rows[-1], flush=True)
    server.shutdown()
    result = {**run_record(), "machine": machine_info(), "rows": rows}
    out_path = REPO / "benchmarks" / "results" / "loadgen_cost.json"
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
