"""Send real predictions to a running hetserve model in every body format and print them.

    python examples/predict.py --model resnet18 --key-file .hetserve/run/key_file.json
    python examples/predict.py --model vit --key-file ... --image kitten.jpg      # image processor
    python examples/predict.py --model bert --key-file ... --text "great movie"   # text processor

Standard library + numpy only. The zoo models have random weights, so the class indices are
not meaningful; the point is the round trip and the shapes.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import sys
import time

import numpy as np


def call(args, method: str, path: str, body: bytes | None, headers: dict[str, str], port: int) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(args.host, port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def keys(path: str) -> dict[str, str]:
    with open(path) as f:
        data = json.load(f)
    return {"inference": data["inference"]["key"], "management": data["management"]["key"]}


def wait_ready(args, key: dict[str, str]) -> dict:
    deadline = time.monotonic() + args.wait
    while True:
        try:
            status, _, body = call(args, "GET", f"/models/{args.model}", None,
                                   {"Authorization": f"Bearer {key['management']}"}, args.management_port)
            if status == 200:
                info = json.loads(body)[0]
                if info["workers"] and all(w["status"] == "READY" for w in info["workers"]):
                    return info
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"model {args.model} not ready after {args.wait} s; see the TorchServe logs")
        time.sleep(1)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def send_media(args, key: dict[str, str]) -> int:
    """Images and texts to an archive with processors: {label: score} back, tensors on request."""
    import mimetypes

    auth = {"Authorization": f"Bearer {key['inference']}"}
    path = f"/predictions/{args.model}"
    requests = []
    for image in args.image or []:
        with open(image, "rb") as f:
            data = f.read()
        kind = mimetypes.guess_type(image)[0] or "application/octet-stream"
        requests.append((f"PUT {image} (as curl -T)", "PUT", data, {}))
        requests.append((f"{image} as {kind}, tensors", "POST", data, {"Content-Type": kind, "X-Hetserve-Raw": "1"}))
    for text in args.text or []:
        requests.append((f"text/plain {text[:30]!r}", "POST", text.encode(), {"Content-Type": "text/plain; charset=utf-8"}))
    if args.text:
        requests.append(("JSON list of texts", "POST", json.dumps({"text": args.text}).encode(), {"Content-Type": "application/json"}))
    failures = 0
    for label, method, body, headers in requests:
        started = time.perf_counter()
        status, _, data = call(args, method, path, body, {**auth, **headers}, args.port)
        ms = (time.perf_counter() - started) * 1e3
        shown = data.decode("utf-8", "replace")
        print(f"[predict] {label:<40} -> {status} in {ms:6.1f} ms: {shown[:300]}")
        failures += status != 200
    return 1 if failures else 0


def top5(logits: np.ndarray) -> str:
    row = logits.reshape(-1, logits.shape[-1])[0]
    best = np.argsort(row)[::-1][:5]
    return ", ".join(f"{i}:{row[i]:.3f}" for i in best)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--key-file", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--management-port", type=int, default=8081)
    p.add_argument("--wait", type=float, default=0, help="seconds to wait for the model to be ready")
    p.add_argument("--shape", default="1,3,224,224", help="input batch shape (a wrong one gets a clear 400)")
    p.add_argument("--image", action="append", help="an image to classify (archives with an image processor)")
    p.add_argument("--text", action="append", help="a text to classify (archives with a text processor)")
    args = p.parse_args()

    deadline = time.monotonic() + max(args.wait, 1)
    while True:
        try:
            key = keys(args.key_file)
            break
        except (OSError, ValueError, KeyError):
            if time.monotonic() > deadline:
                sys.exit(f"no TorchServe key file at {args.key_file}")
            time.sleep(1)
    info = wait_ready(args, key) if args.wait else {}
    if info:
        print(f"[predict] {args.model} ready with {len(info['workers'])} worker(s), batchSize {info.get('batchSize')}")

    if args.image or args.text:
        return send_media(args, key)
    shape = tuple(int(d) for d in args.shape.split(","))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    auth = {"Authorization": f"Bearer {key['inference']}"}
    path = f"/predictions/{args.model}"
    npy = io.BytesIO()
    np.save(npy, x, allow_pickle=False)
    requests = {
        "JSON nested list": (json.dumps(x.tolist()).encode(), {"Content-Type": "application/json"}),
        "raw float32 bytes": (x.tobytes(), {"Content-Type": "application/octet-stream", "X-Tensor-Shape": ",".join(map(str, shape))}),
        ".npy": (npy.getvalue(), {"Content-Type": "application/x-npy"}),
        ".npz (named inputs)": (npz_bytes(image=x), {"Content-Type": "application/x-npz"}),
        "KServe v2": (json.dumps({"id": "demo", "inputs": [{"name": "image", "shape": list(shape), "datatype": "FP32",
                                                             "data": x.ravel().tolist()}]}).encode(), {"Content-Type": "application/json"}),
        "bad (wrong shape)": (json.dumps(np.zeros((1, 3, 8, 8)).tolist()).encode(), {"Content-Type": "application/json"}),
    }
    failures = 0
    for label, (body, headers) in requests.items():
        started = time.perf_counter()
        status, resp_headers, data = call(args, "POST", path, body, {**auth, **headers}, args.port)
        ms = (time.perf_counter() - started) * 1e3
        kind = resp_headers.get("content-type", "")
        if status != 200:
            print(f"[predict] {label:<18} -> {status} in {ms:6.1f} ms: {json.loads(data).get('message')}")
            failures += label.startswith("bad") is False
            continue
        if kind == "application/octet-stream":
            out = np.frombuffer(data, np.float32).reshape([int(d) for d in resp_headers["x-tensor-shape"].split(",")])
        elif "npy" in kind:
            out = np.load(io.BytesIO(data), allow_pickle=False)
        elif "npz" in kind:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                out = archive[archive.files[0]]
        else:
            doc = json.loads(data)
            if "outputs" in doc and isinstance(doc["outputs"], list):
                o = doc["outputs"][0]
                out = np.asarray(o["data"], np.float32).reshape(o["shape"])
            else:
                out = np.asarray(doc["outputs"]["logits"], np.float32)
        print(f"[predict] {label:<18} -> {status} in {ms:6.1f} ms: logits {list(out.shape)}, top-5 {top5(out)}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
