"""Readiness probe for a TorchServe pod: exit 0 only when every model it serves has its workers READY.

TorchServe 0.12's ``/ping`` answers 200 as soon as the frontend is up, seconds before a worker has
verified the archive and calibrated (seen in tests/test_kserve.py), so it cannot gate traffic.
This asks the management API on loopback, for the models and minWorkers of the config's
``model_snapshot``:

    python -m hetserve.ready /mnt/models/config/config.properties
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from hetserve.properties import read_properties


def not_ready(config: Path, timeout: float = 3.0) -> list[str]:
    """Why the server is not ready; empty when it is."""
    props = read_properties(config)
    base = props.get("management_address", "http://127.0.0.1:8081").replace("0.0.0.0", "127.0.0.1")
    snapshot = json.loads(props.get("model_snapshot") or "{}")
    models = snapshot.get("models") or {}
    if not models:
        return [f"{config} has no model_snapshot naming the models to wait for"]
    reasons = []
    for name, versions in models.items():
        wanted = max(int(v.get("minWorkers", 1)) for v in versions.values())
        try:
            with urllib.request.urlopen(f"{base}/models/{name}", timeout=timeout) as resp:  # noqa: S310 - config's own loopback URL
                workers = json.loads(resp.read())[0].get("workers", [])
        except (OSError, ValueError, IndexError, urllib.error.URLError) as exc:
            reasons.append(f"{name}: management API not answering ({exc})")
            continue
        ready = sum(w.get("status") == "READY" for w in workers)
        if ready < wanted:
            reasons.append(f"{name}: {ready}/{wanted} workers READY")
    return reasons


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m hetserve.ready CONFIG_PROPERTIES", file=sys.stderr)
        return 2
    reasons = not_ready(Path(args[0]))
    for reason in reasons:
        print(reason, file=sys.stderr)
    return 1 if reasons else 0


if __name__ == "__main__":
    raise SystemExit(main())
