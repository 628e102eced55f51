"""``hetserve bench``: drive a running TorchServe over REST and record latency against rate.

One invocation measures one configuration (``--label``): a single open-loop rate, a rate sweep
up to the congestion point (``--sweep``), or a closed loop at fixed concurrency. Results merge
into one JSON file (one curve per label) and the PNG is redrawn from every curve in it, so
running bench once per server configuration builds the paper's Fig. 7/9 side by side.

    hetserve bench --url http://127.0.0.1:8080/predictions/resnet18 --shape 1,3,224,224 \\
        --key-file key_file.json --sweep --p99-ms 500 --label default \\
        --out benchmarks/results/bench.json --png benchmarks/results/bench.png

Archives with processors take images (``--image a.jpg --image b.png``, sent as image/*) or
text (``--text "a sentence"``, repeatable, or ``--text-file sentences.txt``: one text/plain
request per line).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from hetserve.knee import Criteria, Sweep, find_knee, plot_curves, sweep_rates
from hetserve.loadgen import (
    ARRIVALS,
    LoadResult,
    Target,
    check_reachable,
    idle_latency,
    read_inference_key,
    run_closed_loop,
    run_open_loop,
    wait_until_idle,
)

RESULTS_FORMAT = "hetserve-bench"


def random_body(shape: Sequence[int], seed: int = 1) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32).tobytes()


def build_target(args: argparse.Namespace) -> Target:
    headers = dict(args.header)
    if args.key_file:
        headers["Authorization"] = f"Bearer {read_inference_key(args.key_file)}"
    content_type = args.content_type
    if args.shape:
        headers.setdefault("X-Tensor-Shape", ",".join(map(str, args.shape)))
        bodies = [random_body(args.shape)]
    elif args.image:
        bodies, content_type = image_bodies(args.image)
    elif args.text or args.text_file:
        bodies, content_type = text_bodies(args.text or [], args.text_file)
    else:
        bodies = [Path(f).read_bytes() for f in args.body_file]
    return Target.create(args.url, bodies, headers, content_type)


def image_bodies(paths: Sequence[str]) -> tuple[list[bytes], str]:
    """Encoded images sent as they are; one content type for all, from the files' suffixes."""
    import mimetypes

    kinds = {mimetypes.guess_type(p)[0] for p in paths}
    if len(kinds) != 1 or not str(next(iter(kinds))).startswith("image/"):
        raise ValueError(f"--image files must be images of one kind (found {sorted(map(str, kinds))})")
    return [Path(p).read_bytes() for p in paths], str(next(iter(kinds)))


def text_bodies(texts: Sequence[str], text_file: str | None) -> tuple[list[bytes], str]:
    lines = list(texts)
    if text_file:
        lines += [line for line in Path(text_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError("--text-file holds no text")
    return [line.encode("utf-8") for line in lines], "text/plain; charset=utf-8"


def point_runner(target: Target, *, duration: float, warmup: float, arrival: str, timeout: float,
                 drain: bool = True, log=print):
    """A `rate -> LoadResult` function that starts each point from an idle server."""
    baseline = idle_latency(target) if drain else 0.0

    def at(rate: float) -> LoadResult:
        if drain:  # an overloaded point leaves a backlog: never charge it to the next rate
            wait_until_idle(target, baseline)
        result = run_open_loop(target, rate, duration, arrival, warmup=warmup, timeout=timeout,
                               seed=int(rate * 100))
        log(describe(result))
        return result

    return at


def describe(r: LoadResult) -> str:
    """One line per point. Latency is of successful requests only: a refused connect takes
    microseconds and is a failure, never a fast answer."""
    load = f"{r.target_rate:7.1f} req/s offered" if r.mode == "open" else f"{r.concurrency:4d} clients"
    ok = r.latency_ms
    latency = (f"p50 {ok.p50:7.1f} ms, p99 {ok.p99:7.1f} ms" if ok.count else "no successful request")
    errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "none"
    return (f"  {load} -> {r.goodput_rps:6.1f} ok/s, {latency}, failed {r.offered - r.ok}/{r.offered} "
            f"({errors}), generator CPU {r.cpu_pct:.0f}%")


def run(args: argparse.Namespace, log=print) -> dict:
    """Measure, merge into args.out, redraw args.png; returns this label's curve entry."""
    if args.out:
        load_results(Path(args.out))  # a wrong --out fails now, not after minutes of measuring
    if args.png:
        _check_plotting()  # before minutes of measuring, not after
    target = build_target(args)
    check_reachable(target, timeout=args.timeout)
    # Failed requests count against the error share, never as latency.
    criteria = Criteria(p99_ms=args.p99_ms, max_error_rate=args.max_error_rate, latency="ok")
    if args.jvm_warmup > 0:  # a fresh TorchServe JVM JIT-compiles for its first tens of seconds
        run_closed_loop(target, 8, args.jvm_warmup, warmup=0.0, timeout=args.timeout)
    entry: dict = {"url": args.url, "label": args.label, "arrival": args.arrival,
                   "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.concurrency:
        result = run_closed_loop(target, args.concurrency, args.duration, warmup=args.warmup,
                                 timeout=args.timeout)
        log(describe(result))
        entry.update(mode="closed", points=[asdict(result)], met=not closed_loop_shortfalls(result, criteria))
    else:
        at = point_runner(target, duration=args.duration, warmup=args.warmup, arrival=args.arrival,
                          timeout=args.timeout, drain=not args.no_drain, log=log)
        if args.sweep:
            sweep = sweep_rates(at, args.start_rate, max_rate=args.max_rate, factor=args.factor,
                                stop_after_failures=2, refine_steps=args.refine, criteria=criteria)
        else:
            points = [at(rate) for rate in args.rate]
            sweep = Sweep(tuple(points), find_knee(points, criteria), criteria)
        entry.update(mode="open", **json.loads(sweep.to_json()))
        entry["met"] = entry["knee_rate"] is not None
        if entry["met"]:
            log(f"  {args.label}: highest sustained rate {entry['knee_rate']:g} req/s "
                f"(p99 <= {args.p99_ms:g} ms, errors <= {args.max_error_rate:.1%})")
        else:
            log(f"  {args.label}: no measured rate met p99 <= {args.p99_ms:g} ms with errors <= {args.max_error_rate:.1%}")
    if args.out:
        merged = merge_results(Path(args.out), entry, criteria)
        if args.png:
            draw(merged, Path(args.png))
    return entry


def closed_loop_shortfalls(result: LoadResult, criteria: Criteria) -> list[str]:
    """The criteria a closed loop can be held to: p99 of the successes and the error share."""
    reasons = []
    p99 = criteria.stats(result).p99
    if p99 is None or p99 > criteria.p99_ms:
        reasons.append(f"p99 {p99} ms > {criteria.p99_ms} ms")
    if result.error_rate > criteria.max_error_rate:
        reasons.append(f"error rate {result.error_rate:.2%} > {criteria.max_error_rate:.2%}")
    return reasons


def _check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--png needs matplotlib: pip install 'hetserve[bench]' (or drop --png)") from None


def load_results(path: Path) -> dict:
    """The results file's content, {} if there is none yet; refuses any other JSON."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc}); give a new --out file") from None
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path} is not a hetserve bench results file; give a new --out file")
    return data


def merge_results(path: Path, entry: dict, criteria: Criteria) -> dict:
    """Add (or replace) this label's curve in the results file; other labels stay."""
    from hetserve.machine import machine_info, run_record

    data = load_results(path)
    curves = dict(data.get("curves", {}))
    curves[entry["label"]] = {**entry, "run": run_record()}
    data = {"format": RESULTS_FORMAT, "machine": machine_info(), "criteria": asdict(criteria), "curves": curves}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def draw(data: dict, png: Path) -> Path:
    criteria = Criteria(**data["criteria"])
    curves = {label: [LoadResult.from_json(json.dumps(p)) for p in c["points"]]
              for label, c in data["curves"].items() if c.get("mode") == "open"}
    if not curves:
        raise ValueError("no open-loop curve to draw")
    return plot_curves(curves, png, log_y=True, criteria=criteria, title="latency vs offered rate")


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"header must look like 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 1,3,224,224, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8080/predictions/MODEL")
    body = p.add_mutually_exclusive_group(required=True)
    body.add_argument("--body-file", action="append", help="request body; repeat to send several round-robin")
    body.add_argument("--shape", type=_shape, help="send one random float32 tensor of this shape (raw bytes)")
    body.add_argument("--image", action="append", help="an image file (archives with an image processor); repeat to round-robin")
    body.add_argument("--text", action="append", help="a sentence sent as text/plain (archives with a text processor); repeatable")
    body.add_argument("--text-file", help="one text/plain request per non-empty line")
    p.add_argument("--content-type", default="application/octet-stream", help="Content-Type of every request")
    p.add_argument("--header", action="append", type=_header, default=[], help="'Name: value', repeatable")
    p.add_argument("--key-file", help="TorchServe's key_file.json: sends its inference key as a Bearer token")
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, action="append", help="open loop at this rate; repeatable")
    load.add_argument("--sweep", action="store_true", help="rising open-loop rates up to the congestion point")
    load.add_argument("--concurrency", type=int, help="closed loop with this many clients")
    p.add_argument("--arrival", choices=ARRIVALS, default="poisson", help="open-loop arrival process")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds at the start of each point")
    p.add_argument("--timeout", type=float, default=10.0, help="per request, from its intended send time")
    p.add_argument("--jvm-warmup", type=float, default=0.0, help="seconds of closed-loop load first (fresh server)")
    p.add_argument("--no-drain", action="store_true", help="do not wait for an idle server between points")
    p.add_argument("--p99-ms", type=float, default=500.0,
                   help="p99 latency of successful requests a rate must keep (exit 1 if no rate does)")
    p.add_argument("--max-error-rate", type=float, default=0.01,
                   help="share of failed requests (non-2xx, timeouts, refused connects) a rate may have")
    p.add_argument("--start-rate", type=float, default=5.0, help="first rate of --sweep, requests/s")
    p.add_argument("--factor", type=float, default=1.3, help="rate multiplier between sweep steps")
    p.add_argument("--max-rate", type=float, default=1000.0, help="highest rate --sweep tries")
    p.add_argument("--refine", type=int, default=2, help="bisection steps after the sweep")
    p.add_argument("--label", default="default", help="name of this configuration's curve")
    p.add_argument("--out", help="results JSON to merge into (one curve per label)")
    p.add_argument("--png", help="redraw every curve of --out as latency vs rate")


def main(args: argparse.Namespace) -> int:
    if args.png and not args.out:
        raise ValueError("--png draws the curves of --out: give --out too")
    entry = run(args)
    # Like k6's thresholds: a run whose criteria no point met is a failed run, for scripts and CI.
    return 0 if entry["met"] else 1
