"""Runtime counters -> TorchServe custom metrics (exposed on the Prometheus endpoint).

Stage run time and queue wait are histograms, one observation per stage run, in seconds: the
frontend's Prometheus histograms use the client's default buckets (5 ms to 10 s), which fit
seconds, so p50/p99 and rates come from ``histogram_quantile`` and ``rate`` as for any service.
Events (placements, timeouts, quarantines, probes, retries, CPU fallbacks) are counters, summed
per batch: each metric update is a log line the frontend parses, so counts go out once a batch.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from handlers.observability.stats import RuntimeStats

log = logging.getLogger(__name__)

STAGE_RUN = "HetserveStageRunSeconds"
QUEUE_WAIT = "HetserveQueueWaitSeconds"
PLACEMENTS = "HetservePlacements"
MICRO_BATCHES = "HetserveMicroBatches"
TIMEOUTS = "HetserveStageTimeouts"
QUARANTINES = "HetserveQuarantines"
PROBES = "HetserveProbes"
RETRIES = "HetserveRetries"
CPU_FALLBACKS = "HetserveCpuFallbacks"

# name -> (TorchServe metric type, unit, dimensions besides ModelName): the exported set, which
# deploy/grafana's dashboard is checked against.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    STAGE_RUN: ("histogram", "s", ("Stage", "Executor")),
    QUEUE_WAIT: ("histogram", "s", ("Stage",)),
    PLACEMENTS: ("counter", "count", ("Stage", "Executor")),
    MICRO_BATCHES: ("counter", "count", ()),
    TIMEOUTS: ("counter", "count", ("Stage", "Executor")),
    QUARANTINES: ("counter", "count", ("Executor",)),
    PROBES: ("counter", "count", ("Executor", "Result")),
    RETRIES: ("counter", "count", ("Stage", "Executor")),
    CPU_FALLBACKS: ("counter", "count", ("Stage", "Executor")),
}


def aggregate(stats: RuntimeStats) -> list[tuple[str, str, str, float, dict[str, str]]]:
    """(name, unit, kind, value, dimensions) rows; plain data so it is testable without TorchServe."""
    rows: list[tuple[str, str, str, float, dict[str, str]]] = []

    def row(name: str, value: float, *dims: str) -> None:
        kind, unit, names = METRICS[name]
        rows.append((name, unit, kind, float(value), dict(zip(names, dims, strict=True))))

    for stage, executor, ms in stats.run_ms:
        row(STAGE_RUN, ms / 1e3, stage, executor)
    for stage, ms in stats.queue_ms:
        row(QUEUE_WAIT, ms / 1e3, stage)
    for (stage, executor), count in sorted(stats.placements.items()):
        row(PLACEMENTS, count, stage, executor)
    if stats.micro_batches:
        row(MICRO_BATCHES, stats.micro_batches)
    for (stage, executor), count in sorted(stats.timeouts.items()):
        row(TIMEOUTS, count, stage, executor)
    for executor, count in sorted(stats.quarantines.items()):
        row(QUARANTINES, count, executor)
    for (executor, result), count in sorted(stats.probes.items()):
        row(PROBES, count, executor, result)
    for (stage, executor), count in sorted(stats.retries.items()):
        row(RETRIES, count, stage, executor)
    for (stage, executor), count in sorted(stats.cpu_fallbacks.items()):
        row(CPU_FALLBACKS, count, stage, executor)
    return rows


def _safe(value: str) -> str:
    # TorchServe's metric log line uses ':', ',', '|' and '#' as separators.
    return value.translate(str.maketrans(":,|#", "____"))


def emit_runtime_metrics(metrics: Any, model_name: str, stats: RuntimeStats) -> None:
    """Never lets a metrics problem fail a request."""
    try:
        from ts.metrics.metric_type_enum import MetricTypes
    except ImportError:
        return
    kinds = {"gauge": MetricTypes.GAUGE, "counter": MetricTypes.COUNTER, "histogram": MetricTypes.HISTOGRAM}
    cache: dict[str, Any] = defaultdict(lambda: None)
    for name, unit, kind, value, dims in aggregate(stats):
        dims = {"ModelName": model_name, **{k: _safe(v) for k, v in dims.items()}}
        try:
            metric = cache[name]
            if metric is None:
                try:
                    metric = metrics.get_metric(name, kinds[kind])
                except Exception:  # noqa: BLE001 - TorchServe raises its own KeyError type
                    metric = metrics.add_metric_to_cache(name, unit, list(dims), kinds[kind])
                cache[name] = metric
            metric.add_or_update(value, list(dims.values()))
        except Exception as exc:  # noqa: BLE001
            log.debug("metric %s not emitted: %s", name, exc)
