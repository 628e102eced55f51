"""Batch-size advisor: for a request rate, the batchSize / maxBatchDelay that minimise latency.

The model is StarONNX's (section IV-B/C), plus the queueing the paper leaves out:

    T        = 1 / rate                                  (request inter-arrival time)
    T_batch  = T * (N - 1)                               (forming a batch of N requests)
    L_paper  = T_batch + T_transfer(N) + T_compute(N)    (the paper's total latency)

TorchServe caps the wait at maxBatchDelay D (counted from the batch's first request) and forms a
batch only when a worker is free, so under load batches fill from the queue with no wait at all.
`simulate` plays exactly that policy (first request taken, then up to N-1 more until D elapses,
one batch formed at a time, W workers) over constant or Poisson arrivals with the per-batch
service time S(b) = overhead + T_transfer(b) + T_compute(b); the queueing delay and the latency
percentiles come out of it. S(b) comes from the runtime's calibrated performance history
(`curve_from_history`) or from any table of measured batch times.

Everything here is pure: plain numbers in, plain dataclasses out; no server needed.
"""

from __future__ import annotations

import heapq
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from handlers.artifact.contract import cpu_layout, serves_split
from handlers.hardware.topology import probe, worker_share
from handlers.runtime.config import RuntimeConfig
from hetserve.loadgen import arrival_offsets, percentile
from partitioner.auto_workers import workers_here

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
DEFAULT_DELAYS_MS = (0, 1, 2, 5, 10, 20, 50, 100)


@dataclass(frozen=True)
class ServiceCurve:
    """Seconds one worker spends on a batch of b samples, start to finish.

    `points` are (batch, compute seconds), interpolated linearly between points and extended
    with the last segment's slope (per-sample cost) beyond them; `overhead_s` is the fixed
    per-batch cost outside the model (frontend <-> worker hand-over, decoding, encoding);
    `transfer_per_sample_s` the host/device copy per sample (0 on CPU-only pipelines).
    """

    points: tuple[tuple[int, float], ...]
    overhead_s: float = 0.0
    transfer_per_sample_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a service curve needs at least one (batch, seconds) point")
        ordered = tuple(sorted((int(b), float(s)) for b, s in self.points))
        if ordered[0][0] < 1 or any(s <= 0 or not math.isfinite(s) for _, s in ordered):
            raise ValueError(f"service curve points must be batch >= 1 and seconds > 0: {ordered}")
        if len({b for b, _ in ordered}) != len(ordered):
            raise ValueError("service curve has two points for one batch size")
        object.__setattr__(self, "points", ordered)

    def compute(self, batch: int) -> float:
        pts = self.points
        if len(pts) == 1:  # one measurement: assume cost proportional to the batch
            return pts[0][1] * batch / pts[0][0]
        for (b0, s0), (b1, s1) in zip(pts, pts[1:], strict=False):
            if batch <= b1:
                if batch < b0:  # below the first point: scale it per sample (errs slow)
                    return s0 * batch / b0
                return s0 + (s1 - s0) * (batch - b0) / (b1 - b0)
        (b0, s0), (b1, s1) = pts[-2], pts[-1]
        return s1 + max(s1 - s0, 0.0) / (b1 - b0) * (batch - b1)

    def transfer(self, batch: int) -> float:
        return self.transfer_per_sample_s * batch

    def seconds(self, batch: int) -> float:
        """S(b): what one batch occupies a worker for."""
        return self.overhead_s + self.transfer(batch) + self.compute(batch)

    def with_overhead(self, overhead_s: float) -> ServiceCurve:
        return ServiceCurve(self.points, max(0.0, overhead_s), self.transfer_per_sample_s)


def paper_latency(rate: float, batch_size: int, curve: ServiceCurve) -> float:
    """StarONNX eq. (IV-C): T*(N-1) + transfer + compute (+ the per-batch overhead), seconds.

    It is the latency of a batch's first request at exactly `rate` with nothing queued."""
    if rate <= 0 or batch_size < 1:
        raise ValueError("rate must be > 0 and batch size >= 1")
    return (batch_size - 1) / rate + curve.seconds(batch_size)


def capacity(curve: ServiceCurve, batch_size: int, workers: int = 1) -> float:
    """Requests/s the workers serve when every batch is full: the rate no delay can exceed."""
    return workers * batch_size / curve.seconds(batch_size)


@dataclass(frozen=True)
class Prediction:
    rate: float
    batch_size: int
    max_delay_ms: float
    workers: int
    sustainable: bool  # rate below the full-batch capacity
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float  # samples per batch actually formed
    utilization: float  # busy fraction of the workers
    paper_ms: float  # L_paper at this rate (first request of a full batch, no queue)

    def to_dict(self) -> dict:
        return asdict(self)


def simulate(curve: ServiceCurve, rate: float, batch_size: int, max_delay_ms: float, *,
             workers: int = 1, arrival: str = "poisson", horizon_s: float | None = None,
             max_requests: int = 20000, seed: int = 0) -> Prediction:
    """Latency of TorchServe's batching policy at `rate`, by discrete-event simulation.

    The first 10% of requests are a warm-up and are not counted. Past capacity the queue grows
    without bound: the percentiles then depend on the horizon and `sustainable` is False.
    """
    if batch_size < 1 or workers < 1 or max_delay_ms < 0:
        raise ValueError("batch size and workers must be >= 1 and the delay >= 0")
    horizon = horizon_s if horizon_s is not None else min(120.0, max_requests / rate)
    arrivals = arrival_offsets(rate, horizon, arrival, seed)[:max_requests]
    latencies, batches, busy = _play(curve, arrivals, batch_size, max_delay_ms / 1000.0, workers)
    skip = len(latencies) // 10
    measured = sorted(latencies[skip:]) or sorted(latencies)
    span = (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 1.0 / rate
    ms = [x * 1000.0 for x in measured]
    return Prediction(
        rate=rate, batch_size=batch_size, max_delay_ms=max_delay_ms, workers=workers,
        sustainable=rate < capacity(curve, batch_size, workers),
        mean_ms=sum(ms) / len(ms), p50_ms=percentile(ms, 50), p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99), mean_batch=sum(batches) / len(batches),
        utilization=min(1.0, busy / (workers * max(span, 1e-9))),
        paper_ms=paper_latency(rate, batch_size, curve) * 1000.0,
    )


def _play(curve: ServiceCurve, arrivals: Sequence[float], n: int, delay: float,
          workers: int) -> tuple[list[float], list[int], float]:
    """-> (latency per request, size per batch, total busy seconds).

    One batch is formed at a time (TorchServe's pollBatch holds the model's lock): a free worker
    takes the oldest request (waiting for it if none is queued), then every request that
    arrives before that moment + `delay`, up to `n` in all.
    """
    free_at = [0.0] * workers
    batcher_free = 0.0
    latencies = [0.0] * len(arrivals)
    batches: list[int] = []
    busy = 0.0
    i = 0
    while i < len(arrivals):
        worker_free = heapq.heappop(free_at)
        taken = max(worker_free, batcher_free, arrivals[i])
        deadline = taken + delay
        j = i + 1
        while j < len(arrivals) and j - i < n and arrivals[j] <= deadline:
            j += 1
        closed = max(taken, arrivals[j - 1]) if j - i == n else deadline
        service = curve.seconds(j - i)
        done = closed + service
        for k in range(i, j):
            latencies[k] = done - arrivals[k]
        batches.append(j - i)
        busy += service
        heapq.heappush(free_at, done)
        batcher_free = closed
        i = j
    return latencies, batches, busy


def predict_knee(curve: ServiceCurve, batch_size: int, max_delay_ms: float, p99_ms: float, *,
                 workers: int = 1, arrival: str = "poisson", steps: int = 14, seed: int = 0) -> float:
    """Highest rate (requests/s) whose simulated p99 stays <= `p99_ms`; 0 if none does."""
    hi = capacity(curve, batch_size, workers)
    lo = hi * 1e-3
    if not _meets(curve, lo, batch_size, max_delay_ms, p99_ms, workers, arrival, seed):
        return 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        if _meets(curve, mid, batch_size, max_delay_ms, p99_ms, workers, arrival, seed):
            lo = mid
        else:
            hi = mid
    return lo


def _meets(curve, rate, n, delay_ms, p99_ms, workers, arrival, seed) -> bool:
    pred = simulate(curve, rate, n, delay_ms, workers=workers, arrival=arrival, seed=seed)
    return pred.sustainable and pred.p99_ms <= p99_ms


@dataclass(frozen=True)
class Advice:
    rate: float
    objective: str  # "mean" or "p99"
    best: Prediction | None  # None: no candidate sustains the rate
    ranked: tuple[Prediction, ...]  # sustainable candidates, best first

    def to_dict(self) -> dict:
        return {"rate": self.rate, "objective": self.objective,
                "best": self.best.to_dict() if self.best else None,
                "ranked": [p.to_dict() for p in self.ranked]}


def recommend(curve: ServiceCurve, rate: float, *, batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
              delays_ms: Iterable[float] = DEFAULT_DELAYS_MS, workers: int = 1,
              objective: str = "mean", arrival: str = "poisson", headroom: float = 0.9,
              seed: int = 0) -> Advice:
    """Every (batchSize, maxBatchDelay) pair simulated at `rate`; the lowest latency first.

    Pairs whose full-batch capacity is not above rate / `headroom` are left out: the simulation
    of a nearly saturated queue is too sensitive to the horizon to trust."""
    if objective not in ("mean", "p99"):
        raise ValueError(f"objective must be 'mean' or 'p99', got {objective!r}")
    key = "mean_ms" if objective == "mean" else "p99_ms"
    delays = tuple(delays_ms)
    candidates = []
    for n in batch_sizes:
        if capacity(curve, n, workers) * headroom <= rate:
            continue
        for d in (delays if n > 1 else (0,)):  # a batch of one never waits
            candidates.append(simulate(curve, rate, n, d, workers=workers, arrival=arrival, seed=seed))
    ranked = tuple(sorted(candidates, key=lambda p: (getattr(p, key), p.batch_size, p.max_delay_ms)))
    return Advice(rate, objective, ranked[0] if ranked else None, ranked)


# ---------------------------------------------------------------------------- from the history


@dataclass(frozen=True)
class Layout:
    """Which executors may run each stage in one worker: {"whole": [...]} or {"head", "tail"}."""

    stages: Mapping[str, tuple[str, ...]]
    micro_batch: int = 0  # 0: a batch is split evenly over the head executors


def stage_seconds(history, stage: str, executors: Sequence[str], batch: int) -> float:
    """Mean over `executors` of the history's predicted run time; raises if none has one."""
    times = [t for e in executors if (t := history.predict_run(stage, e, batch)) is not None]
    if not times:
        raise ValueError(f"the performance history has no run of stage {stage!r} on {list(executors)}")
    return sum(times) / len(times)


def batch_compute_seconds(history, layout: Layout, batch: int) -> float:
    """Time for one batch to pass the worker's runtime, from the per-stage history.

    The runtime cuts the batch into k micro-batches of m samples. One stage on E executors:
    ceil(k/E) rounds of t(m). Head and tail on separate executors (a pipeline): the slower
    stage's rounds plus one pass of the faster. Head and tail sharing executors: their total
    work spread over all of them, never less than one micro-batch's head + tail.
    """
    stages = layout.stages
    first = "whole" if "whole" in stages else "head"
    m = layout.micro_batch or math.ceil(batch / len(stages[first]))
    m = max(1, min(m, batch))
    k = math.ceil(batch / m)
    if "whole" in stages:
        ex = stages["whole"]
        return math.ceil(k / len(ex)) * stage_seconds(history, "whole", ex, m)
    head_ex, tail_ex = stages["head"], stages["tail"]
    th = stage_seconds(history, "head", head_ex, m)
    tt = stage_seconds(history, "tail", tail_ex, m)
    if set(head_ex).isdisjoint(tail_ex):
        rounds_h, rounds_t = math.ceil(k / len(head_ex)), math.ceil(k / len(tail_ex))
        return max(rounds_h * th, rounds_t * tt) + min(th, tt)
    every = set(head_ex) | set(tail_ex)
    return max(th + tt, k * (th + tt) / len(every))


def curve_from_history(history, layout: Layout, max_batch: int = 64, overhead_s: float = 0.0,
                       transfer_per_sample_s: float = 0.0) -> ServiceCurve:
    """A ServiceCurve for batches 1..max_batch from a `handlers.runtime.perf_model.PerfHistory`.

    The history's means are EWMAs of runs under whatever load came last: after an overloaded
    sweep a big bucket can read several times its idle cost (seen: 352 ms for a batch of 8 whose
    batch of 4 took 52 ms). A batch is never slower than two smaller ones run back to back, so
    the curve is made subadditive: t(a + b) <= t(a) + t(b).
    """
    times = [0.0] + [batch_compute_seconds(history, layout, b) for b in range(1, max_batch + 1)]
    for b in range(2, max_batch + 1):
        times[b] = min(times[b], min(times[a] + times[b - a] for a in range(1, b // 2 + 1)))
    return ServiceCurve(tuple(enumerate(times))[1:], overhead_s, transfer_per_sample_s)


def layout_for(config: RuntimeConfig, partitioned: bool, topology) -> Layout:
    """The executors one CPU-only worker builds for a config (the archive contract's layout)."""
    return Layout(cpu_layout(config, partitioned, topology), config.micro_batch)


def served_split(config: RuntimeConfig, history, archive=None, cpu_cores: int | None = None) -> bool:
    """Whether the worker a history comes from ran head + tail: the archive contract's rule
    (one-core workers included) when the archive is known; without it, a ratio left to the
    archive counts as split when the history timed a head stage."""
    if archive is not None:
        return serves_split(config.ratio, archive.manifest.default_ratio, cpu_cores)
    if config.ratio is None:
        return any(history.is_calibrated("head", e) for e in _executors_in(history))
    return serves_split(config.ratio, None)


# ---------------------------------------------------------------------------- against measurements


def fit_overhead(curve: ServiceCurve, rate: float, batch_size: int, max_delay_ms: float,
                 measured_mean_ms: float, *, workers: int = 1, arrival: str = "poisson") -> float:
    """The per-batch overhead (seconds) that makes the predicted mean latency at `rate` match
    the measured one; 0 when the model alone already predicts more. Bisection: more overhead
    never lowers the mean."""
    def mean_ms(overhead: float) -> float:
        return simulate(curve.with_overhead(overhead), rate, batch_size, max_delay_ms,
                        workers=workers, arrival=arrival).mean_ms

    lo, hi = 0.0, measured_mean_ms / 1000.0
    if mean_ms(lo) >= measured_mean_ms:
        return 0.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_ms(mid) < measured_mean_ms else (lo, mid)
    return (lo + hi) / 2


def _rel(pred: float | None, measured: float | None) -> float | None:
    if pred is None or not measured:
        return None
    return (pred - measured) / measured


def check_rows(rows: Mapping[str, Mapping], history, p99_ms: float, topology=None,
               arrival: str = "poisson") -> dict:
    """Predicted vs measured for every hetserve row of a serving_cpu.json model entry.

    Each row holds its model-config overrides and its open-loop sweep points. The per-batch
    overhead outside the model (TorchServe's hand-over, decode, encode) is not in the history:
    it is fitted once per model, as the median over rows of measured minus predicted mean
    latency at each row's lowest rate, and every other point is then a genuine prediction.
    """
    prepared = {}
    box = topology or probe()
    for name, row in rows.items():
        cfg, points = row.get("config"), row.get("points")
        if not cfg or not points:
            continue
        config = RuntimeConfig.from_model_yaml(cfg)
        workers = workers_here(cfg.get("minWorkers"))
        layout = layout_for(config, served_split(config, history), worker_share(box, workers))
        n, delay = int(cfg.get("batchSize") or 1), float(cfg.get("maxBatchDelay") or 0)
        curve = curve_from_history(history, layout, max_batch=max(n, 1))
        ordered = sorted(points, key=lambda p: p["target_rate"])
        prepared[name] = (curve, ordered, n, delay, workers, layout)
    if not prepared:
        raise ValueError("no row with a config and sweep points to check")
    fits = []
    for curve, ordered, n, delay, workers, _ in prepared.values():
        first = ordered[0]
        if first["latency_all_ms"]["mean"] is not None:
            fits.append(fit_overhead(curve, first["target_rate"], n, delay, first["latency_all_ms"]["mean"],
                                     workers=workers, arrival=arrival))
    overhead_ms = statistics.median(fits) * 1000.0 if fits else 0.0
    out_rows = {}
    for name, (curve, ordered, n, delay, workers, layout) in prepared.items():
        fitted = curve.with_overhead(overhead_ms / 1000.0)
        pts = []
        for p in ordered:
            pred = simulate(fitted, p["target_rate"], n, delay, workers=workers, arrival=arrival)
            meas = p["latency_all_ms"]
            pts.append({
                "rate": p["target_rate"], "measured_mean_ms": meas["mean"], "predicted_mean_ms": pred.mean_ms,
                "measured_p99_ms": meas["p99"], "predicted_p99_ms": pred.p99_ms,
                "mean_error": _rel(pred.mean_ms, meas["mean"]), "p99_error": _rel(pred.p99_ms, meas["p99"]),
                "measured_sustained": p["throughput_rps"] >= 0.95 * p["offered"] / max(p["duration_s"], 1e-9)
                and (meas["p99"] or math.inf) <= p99_ms,
                "predicted_sustainable": pred.sustainable,
            })
        knee = predict_knee(fitted, n, delay, p99_ms, workers=workers, arrival=arrival)
        sustained = [abs(x["mean_error"]) for x in pts if x["measured_sustained"] and x["mean_error"] is not None]
        measured_knee = rows[name].get("knee_rate")
        out_rows[name] = {
            "batch_size": n, "max_delay_ms": delay, "workers": workers,
            "layout": {k: list(v) for k, v in layout.stages.items()},
            "service_ms": {b: round(fitted.seconds(b) * 1000, 3) for b in sorted({1, n})},
            "predicted_knee_rps": knee, "measured_knee_rps": measured_knee,
            "knee_error": _rel(knee, measured_knee),
            # every tested rate held: the true knee lies higher, the error is only a bound
            "measured_knee_is_lower_bound": bool(pts) and all(x["measured_sustained"] for x in pts),
            "median_abs_mean_error_below_knee": statistics.median(sustained) if sustained else None,
            "points": pts,
        }
    return {"fitted_overhead_ms": overhead_ms, "p99_target_ms": p99_ms, "rows": out_rows,
            "batch_choice": batch_choice(rows, out_rows)}


def batch_choice(rows: Mapping[str, Mapping], checked: Mapping[str, dict]) -> list[dict]:
    """Where rows differ only in batchSize/maxBatchDelay and share rates (benchmarks/curves.py):
    at each shared rate, the measured fastest row against the one the model predicts fastest,
    and what following the prediction costs (its measured mean / the best measured mean)."""
    groups: dict[str, list[str]] = {}
    for name in checked:
        cfg = {k: v for k, v in rows[name]["config"].items() if k not in ("batchSize", "maxBatchDelay")}
        groups.setdefault(json.dumps(cfg, sort_keys=True), []).append(name)
    out = []
    for names in (g for g in groups.values() if len(g) > 1):
        by_rate = {n: {p["rate"]: p for p in checked[n]["points"]} for n in names}
        for rate in sorted(set.intersection(*(set(r) for r in by_rate.values()))):
            held = [n for n in names if by_rate[n][rate]["measured_sustained"]]
            if not held:
                continue
            measured_best = min(held, key=lambda n: by_rate[n][rate]["measured_mean_ms"])
            predicted_best = min(names, key=lambda n: by_rate[n][rate]["predicted_mean_ms"])
            advised = by_rate[predicted_best][rate]
            out.append({
                "rate": rate, "measured_best": measured_best, "predicted_best": predicted_best,
                "agree": measured_best == predicted_best,
                "penalty": (advised["measured_mean_ms"] / by_rate[measured_best][rate]["measured_mean_ms"]
                            if advised["measured_sustained"] else None),
            })
    return out


# ---------------------------------------------------------------------------- files (CLI side)


def history_for_mar(mar, state_dir=None):
    """(history path, Archive) for a .mar: the state file the runtime serving it writes (an
    explicit ``state_dir`` first, then the archive's own hetserve.state_dir, then the default)."""
    from handlers.artifact.contract import read_archive

    archive = read_archive(mar)
    return archive.state_path(state_dir), archive


def newest_history(model: str, state_dir=None):
    from handlers.artifact.contract import histories_of
    from handlers.artifact.contract import state_dir as resolve

    found = histories_of(model, state_dir)
    if not found:
        raise FileNotFoundError(f"no performance history for {model!r} in {resolve(state_dir)} "
                                "(serve the model once: the runtime writes it)")
    return found[-1]


def load_history(path):
    from handlers.runtime.perf_model import PerfHistory

    return PerfHistory.from_json(json.loads(path.read_text()))


def advise_from_files(*, mar=None, history_path=None, state_dir=None, config: Mapping | None = None,
                      rates: Sequence[float], p99_ms: float = 500.0, objective: str = "mean",
                      arrival: str = "poisson", overhead_ms: float = 0.0, batch_sizes=None,
                      delays_ms=None) -> dict:
    config = dict(config or {})
    knobs = RuntimeConfig.from_model_yaml(config)
    archive = None
    if mar is not None:
        history_path, archive = history_for_mar(mar, state_dir)
    history = load_history(history_path)
    # --set first, then what the archive serves with (auto: this box's count)
    asked = config.get("minWorkers", archive.model_config.get("minWorkers") if archive else None)
    workers = workers_here(asked)
    share = worker_share(probe(), workers)
    layout = layout_for(knobs, served_split(knobs, history, archive, len(share.cores)), share)
    sizes = tuple(batch_sizes or DEFAULT_BATCH_SIZES)
    curve = curve_from_history(history, layout, max_batch=max(sizes), overhead_s=overhead_ms / 1000.0)
    advice = [recommend(curve, r, batch_sizes=sizes, delays_ms=tuple(delays_ms or DEFAULT_DELAYS_MS),
                        workers=workers, objective=objective, arrival=arrival).to_dict() for r in rates]
    knees = {n: predict_knee(curve, n, 0, p99_ms, workers=workers, arrival=arrival) for n in sizes}
    return {"history": str(history_path), "layout": {k: list(v) for k, v in layout.stages.items()},
            "workers": workers, "overhead_ms": overhead_ms, "p99_ms": p99_ms,
            "service_ms": {b: round(curve.seconds(b) * 1000, 3) for b in sizes},
            "predicted_max_rate_by_batch_size": knees, "advice": advice}


def _executors_in(history) -> set[str]:
    return {r["executor"] for r in history.to_json()["runs"]}


def check_file(path, state_dir=None, store=None) -> dict:
    """`check_rows` for every model of a serving_cpu.json, each against the history of
    `store/{model}.mar` when a store is given, else the model's newest history."""
    from hetserve.machine import run_record

    data = json.loads(path.read_text())
    p99 = float(data.get("criteria", {}).get("p99_ms", 500.0))
    models = {}
    for model, entry in data.get("models", {}).items():
        if store is not None:
            history_path, _ = history_for_mar(Path(store) / f"{model}.mar", state_dir)
            if not history_path.exists():
                raise FileNotFoundError(f"no performance history {history_path} for {store}/{model}.mar")
        else:
            history_path = newest_history(model, state_dir)
        result = check_rows(entry["rows"], load_history(history_path), p99)
        models[model] = {"history": str(history_path), **result}
    if not models:
        raise ValueError(f"{path} holds no models")
    return {**run_record(), "source": str(path), "models": models}
