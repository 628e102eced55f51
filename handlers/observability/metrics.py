"""Runtime counters -> TorchServe custom metrics (exposed on the Prometheus endpoint).

One line per (metric, dimensions) per batch, aggregated here, because each metric update is a
log line the frontend parses: per-micro-batch lines would tax the hot path.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from handlers.runtime.flow import RuntimeStats

log = logging.getLogger(__name__)

STAGE_RUN = "HetserveStageRunMs"
QUEUE_WAIT = "HetserveQueueWaitMs"
PLACEMENTS = "HetservePlacements"
MICRO_BATCHES = "HetserveMicroBatches"


def aggregate(stats: RuntimeStats) -> list[tuple[str, str, str, float, dict[str, str]]]:
    """(name, unit, kind, value, dimensions) rows; plain data so it is testable without TorchServe."""
    rows = []
    runs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for stage, executor, ms in stats.run_ms:
        runs[(stage, executor)].append(ms)
    for (stage, executor), values in sorted(runs.items()):
        rows.append(
            (
                STAGE_RUN,
                "ms",
                "gauge",
                sum(values) / len(values),
                {"Stage": stage, "Executor": executor},
            )
        )
    waits: dict[str, list[float]] = defaultdict(list)
    for stage, ms in stats.queue_ms:
        waits[stage].append(ms)
    for stage, values in sorted(waits.items()):
        rows.append((QUEUE_WAIT, "ms", "gauge", sum(values) / len(values), {"Stage": stage}))
    for (stage, executor), count in sorted(stats.placements.items()):
        rows.append(
            (PLACEMENTS, "count", "counter", float(count), {"Stage": stage, "Executor": executor})
        )
    if stats.micro_batches:
        rows.append((MICRO_BATCHES, "count", "counter", float(stats.micro_batches), {}))
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
    kinds = {"gauge": MetricTypes.GAUGE, "counter": MetricTypes.COUNTER}
    for name, unit, kind, value, dims in aggregate(stats):
        dims = {"ModelName": model_name, **{k: _safe(v) for k, v in dims.items()}}
        try:
            try:
                metric = metrics.get_metric(name, kinds[kind])
            except Exception:  # noqa: BLE001 - TorchServe raises its own KeyError type
                metric = metrics.add_metric_to_cache(name, unit, list(dims), kinds[kind])
            metric.add_or_update(value, list(dims.values()))
        except Exception as exc:  # noqa: BLE001
            log.debug("metric %s not emitted: %s", name, exc)
