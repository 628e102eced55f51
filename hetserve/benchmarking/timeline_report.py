"""Analysis of a recorded timeline (``handlers.observability.tracing``): spans in, numbers out.

``overlap_report`` says how much of the transfer time was hidden behind compute and how much the
stages ran side by side, which is what StarONNX's multi-stream design is for. ``chrome_trace``
writes the Trace Event Format that Perfetto and chrome://tracing open. Offline only: nothing
here ships in a ``.mar``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from handlers.observability.tracing import COMPUTE, HOST, TRANSFER, Span


def merge(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals as sorted, disjoint intervals."""
    merged: list[list[float]] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def length(intervals: Iterable[tuple[float, float]]) -> float:
    return sum(b - a for a, b in merge(intervals))


def intersection(
    a: Iterable[tuple[float, float]], b: Iterable[tuple[float, float]]
) -> list[tuple[float, float]]:
    """Where both unions are busy."""
    left, right = merge(a), merge(b)
    out, i, j = [], 0, 0
    while i < len(left) and j < len(right):
        start, end = max(left[i][0], right[j][0]), min(left[i][1], right[j][1])
        if end > start:
            out.append((start, end))
        if left[i][1] < right[j][1]:
            i += 1
        else:
            j += 1
    return out


def clip(spans: Iterable[Span], start: float, end: float) -> list[Span]:
    """The spans inside [start, end), cut at its edges."""
    return [replace(s, start=max(s.start, start), end=min(s.end, end))
            for s in spans if min(s.end, end) > max(s.start, start)]


def _intervals(spans: Iterable[Span]) -> list[tuple[float, float]]:
    return [(s.start, s.end) for s in spans]


def overlap_report(spans: Sequence[Span], window: tuple[float, float] | None = None) -> dict[str, Any]:
    """How busy each lane was, how much transfer time ran under compute, and how much the
    stages ran at the same time, over ``window`` (default: first to last span)."""
    if not spans:
        return {"window_s": 0.0, "lanes": {}, "host_phases": {}, "runs": {}, "transfer_s": 0.0,
                "transfer_hidden_share": None, "stages": {}, "stages_concurrent_s": 0.0}
    if window is None:
        window = (min(s.start for s in spans), max(s.end for s in spans))
    spans = clip(spans, *window)
    width = window[1] - window[0]
    lanes: dict[str, dict[str, Any]] = {}
    for lane in sorted({s.lane for s in spans}):
        own = [s for s in spans if s.lane == lane]
        busy = length(_intervals(own))
        lanes[lane] = {"busy_s": busy, "busy_share": busy / width if width else None,
                       "spans": len(own), "kind": own[0].kind}
    transfers = _intervals(s for s in spans if s.kind == TRANSFER)
    compute = _intervals(s for s in spans if s.kind == COMPUTE)
    transfer_s = length(transfers)
    hidden = length(intersection(transfers, compute))
    stages: dict[str, float] = {}
    by_stage: dict[str, list[tuple[float, float]]] = {}
    for s in spans:
        if s.kind == COMPUTE:
            by_stage.setdefault(s.name, []).append((s.start, s.end))
    for name, intervals in sorted(by_stage.items()):
        stages[name] = length(intervals)
    # Time when at least two different stages computed at once: the pipeline's overlap.
    concurrent: list[tuple[float, float]] = []
    names = sorted(by_stage)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            concurrent += intersection(by_stage[a], by_stage[b])
    runs: dict[str, dict[str, float]] = {}
    for s in spans:
        if s.kind in (COMPUTE, TRANSFER):
            where = "cuda" if "cuda" in s.lane else "cpu"  # CUDA executors are "cuda<d>s<k>"
            key = f"{s.name}@{where}" if s.kind == COMPUTE else s.name
            run = runs.setdefault(key, {"count": 0, "seconds": 0.0, "rows": 0, "bytes": 0})
            run["count"] += 1
            run["seconds"] += s.seconds
            run["rows"] += s.batch
            run["bytes"] += s.nbytes
    host_phases: dict[str, dict[str, float]] = {}
    for s in spans:
        if s.kind == HOST:
            phase = host_phases.setdefault(f"{s.lane}/{s.name}", {"seconds": 0.0, "count": 0})
            phase["seconds"] += s.seconds
            phase["count"] += 1
    return {
        "window_s": width,
        "lanes": lanes,
        # Host-side phases (the handler's decode/assemble/run/encode, a CUDA executor's thread):
        # total seconds and how many spans, so a mean per batch is seconds / count.
        "host_phases": dict(sorted(host_phases.items())),
        # Per stage and device ("head@cuda", "tail@cpu") and per transfer link: totals, so that
        # seconds / count is a mean run and rows / count its mean batch.
        "runs": dict(sorted(runs.items())),
        "transfer_s": transfer_s,
        "transfer_bytes": sum(s.nbytes for s in spans if s.kind == TRANSFER),
        "transfer_hidden_s": hidden,
        # The share of transfer time during which some compute ran too: 1.0 = fully overlapped.
        "transfer_hidden_share": hidden / transfer_s if transfer_s else None,
        "compute_s": length(compute),
        "stages": stages,
        "stages_concurrent_s": length(concurrent),
    }


def chrome_trace(spans: Sequence[Span], origin: float | None = None) -> dict[str, Any]:
    """Trace Event Format ("X" complete events, microseconds), one thread row per lane."""
    if origin is None:
        origin = min((s.start for s in spans), default=0.0)
    lanes = sorted({s.lane for s in spans})
    tid = {lane: i + 1 for i, lane in enumerate(lanes)}
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": tid[lane], "args": {"name": lane}}
        for lane in lanes
    ]
    for s in sorted(spans, key=lambda s: s.start):
        events.append({
            "ph": "X", "pid": 1, "tid": tid[s.lane], "name": s.name, "cat": s.kind,
            "ts": round((s.start - origin) * 1e6, 3), "dur": round(s.seconds * 1e6, 3),
            "args": {"batch": s.batch, "bytes": s.nbytes},
        })
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _prefix(lane: str) -> str:
    """A worker's lane prefix ("w0/", "1234/") or "" for a single worker's lanes."""
    return lane.rsplit("/", 1)[0] + "/" if "/" in lane and not lane.startswith("cuda") else ""


def _mean_ms(values: Sequence[float]) -> float | None:
    return round(1e3 * sum(values) / len(values), 3) if values else None


def served_breakdown(
    spans: Sequence[Span],
    requests: Sequence[tuple[float, float]],
    window: tuple[float, float],
) -> dict[str, Any]:
    """Where a served batch's time goes, from a worker's spans and the client's own times.

    ``spans``: what ``InferenceService`` and its executors recorded (lane "worker": one "handle"
    span per batch; lane "handler": its decode/assemble/run/encode; executor lanes: compute and
    transfers); several workers' lanes carry a prefix ("w0/worker"). ``requests``: each
    successful request's (sent, received) on the same clock (CLOCK_MONOTONIC on Linux: the
    loop clock of ``hetserve.loadgen`` and the worker's ``perf_counter``). Batches and requests
    count when they start inside ``window``.

    Per batch (mean ms): the handler's phases, each stage's compute, the run phase's time not
    covered by its own worker's compute (hand-over between stages, placement, waiting), and how
    long each executor lane and each worker sat idle per batch *of that worker*; per worker
    (its lane prefix, "worker" for unprefixed lanes): its batches and their mean handle. Per request: client send to the start of
    the batch that answered it, that batch's handle, its end to the client's receive; a request
    is matched to the latest batch that started after it was sent and ended before it came back.
    """
    lo, hi = window
    width = hi - lo
    inside = [s for s in spans if lo <= s.start < hi]
    handles = sorted((s for s in inside if s.lane.endswith("worker") and s.name == "handle"),
                     key=lambda s: s.end)
    batches = len(handles)
    per_batch: dict[str, float | None] = {}
    if batches:
        phases: dict[str, float] = {}
        for s in inside:
            if s.kind == HOST and s.lane.endswith("handler"):
                phases[s.name] = phases.get(s.name, 0.0) + s.seconds
        per_batch = {f"handler_{k}_ms": round(1e3 * v / batches, 3) for k, v in sorted(phases.items())}
        per_batch["handle_ms"] = _mean_ms([h.seconds for h in handles])
        # The TorchServe adapter around handle: request objects in, statuses, headers and
        # metrics out (recorded after each batch, so it is flushed with the next one).
        adapter = [s.seconds for s in inside if s.lane.endswith("adapter") and s.name == "adapter"]
        if adapter:
            per_batch["adapter_outside_handle_ms"] = round(
                1e3 * sum(adapter) / len(adapter) - (per_batch["handle_ms"] or 0.0), 3)
        per_batch["requests_per_batch"] = round(sum(h.batch for h in handles) / batches, 3)
    compute = [s for s in spans if s.kind == COMPUTE]
    stages: dict[str, dict[str, float]] = {}
    for s in (c for c in compute if lo <= c.start < hi):
        entry = stages.setdefault(f"{s.name}@{s.lane}", {"runs": 0, "seconds": 0.0, "rows": 0})
        entry["runs"] += 1
        entry["seconds"] += s.seconds
        entry["rows"] += s.batch
    stage_rows = {k: {"runs_per_batch": round(v["runs"] / batches, 3) if batches else None,
                      "mean_run_ms": round(1e3 * v["seconds"] / v["runs"], 3),
                      "mean_rows": round(v["rows"] / v["runs"], 3)}
                  for k, v in sorted(stages.items())}
    # The run phase minus its own worker's compute: stage hand-over, placement, queueing.
    not_compute = []
    for run in (s for s in inside if s.kind == HOST and s.lane.endswith("handler") and s.name == "run"):
        mine = [(c.start, c.end) for c in compute if _prefix(c.lane) == _prefix(run.lane)]
        not_compute.append(run.seconds - length(intersection([(run.start, run.end)], mine)))
    lanes = sorted({s.lane for s in compute} | {h.lane for h in handles})
    # Several workers each take their own batches: a lane's idle time is per batch of its worker.
    worker_handles: dict[str, list[Span]] = {}
    for h in handles:
        worker_handles.setdefault(_prefix(h.lane), []).append(h)
    idle = {}
    for lane in lanes:
        own = clip([s for s in spans if s.lane == lane and s.kind in (COMPUTE, HOST)
                    and (s.kind == COMPUTE or s.name == "handle")], lo, hi)
        busy = length(_intervals(own))
        mine = len(worker_handles.get(_prefix(lane), ()))
        idle[lane] = {"idle_share": round(1 - busy / width, 4) if width else None,
                      "idle_ms_per_batch": round(1e3 * (width - busy) / mine, 3) if mine else None}
    workers = {(prefix.rstrip("/") or "worker"): {
        "batches": len(own_handles),
        "handle_ms": _mean_ms([h.seconds for h in own_handles]),
        "requests_per_batch": round(sum(h.batch for h in own_handles) / len(own_handles), 3),
    } for prefix, own_handles in sorted(worker_handles.items())}
    # Requests -> the batch that answered them.
    ends = [h.end for h in handles]
    to_handler, from_handler, latency, unmatched = [], [], [], 0
    for sent, done in requests:
        if not lo <= sent < hi:
            continue
        latency.append(done - sent)
        i = bisect.bisect_right(ends, done) - 1
        # A batch already running when the request left cannot hold it; with several workers
        # an earlier-ending batch of another one may (none once batches end before the send).
        while i >= 0 and handles[i].start < sent and handles[i].end >= sent:
            i -= 1
        if i < 0 or handles[i].start < sent:
            unmatched += 1
            continue
        to_handler.append(handles[i].start - sent)
        from_handler.append(done - handles[i].end)
    return {
        "window_s": width,
        "batches": batches,
        "per_batch": {**per_batch, "run_not_compute_ms": _mean_ms(not_compute)},
        "stages": stage_rows,
        "idle": idle,
        "workers": workers,
        "per_request": {
            "requests": len(latency),
            "matched": len(to_handler),
            "unmatched": unmatched,
            "client_latency_ms": _mean_ms(latency),
            "send_to_handle_start_ms": _mean_ms(to_handler),
            "handle_end_to_receive_ms": _mean_ms(from_handler),
        },
    }
