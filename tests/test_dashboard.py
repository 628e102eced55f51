"""deploy/grafana's dashboard graphs only what is exported, with the labels it has, and all of it.

hetserve's metrics come from handlers.observability.metrics.METRICS (what the handler emits; test_serving and
test_resilience read them back from a real /metrics); TorchServe's from its own metrics.yaml.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from handlers.observability.metrics import METRICS

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "hetserve-dashboard.json"
HISTOGRAM_SERIES = ("_bucket", "_count", "_sum")
# Added to every model metric by TorchServe's backend (Hostname) or by Prometheus (le on buckets).
IMPLICIT_LABELS = {"Hostname", "le"}
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "label_values", "without", "avg",
                "max", "min", "count", "on", "ignoring", "le"}


def _torchserve_metrics() -> dict[str, set[str]]:
    import ts

    data = yaml.safe_load((Path(ts.__file__).parent / "configs" / "metrics.yaml").read_text())
    out = {}
    for section in ("ts_metrics", "model_metrics"):
        for entries in (data.get(section) or {}).values():
            for entry in entries:
                out[entry["name"]] = set(entry["dimensions"]) | {"Hostname"}
    return out


def _queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def _selectors(expr: str) -> list[tuple[str, set[str], set[str]]]:
    """(metric, labels matched in {...}, labels grouped by) for each metric named in ``expr``."""
    found = []
    for match in re.finditer(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*(\{[^}]*\})?", expr):
        name, matcher = match.group(1), match.group(2) or ""
        if name in PROMQL_WORDS or not (name.startswith("Hetserve") or name.startswith("ts_")):
            continue
        labels = set(re.findall(r"([A-Za-z_]\w*)\s*=~?", matcher))
        found.append((name, labels, set()))
    grouped = {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
    return [(name, labels, grouped) for name, labels, _ in found]


DASH = json.loads(DASHBOARD.read_text())
QUERIES = _queries(DASH)
TS_METRICS = _torchserve_metrics()


def _resolve(series: str) -> tuple[str, set[str]]:
    """-> (exported metric, its labels) for a series name, or AssertionError."""
    if series in TS_METRICS:
        return series, TS_METRICS[series]
    for suffix in HISTOGRAM_SERIES:
        base = series.removesuffix(suffix)
        if base != series and base in METRICS:
            assert METRICS[base][0] == "histogram", f"{series}: {base} is a {METRICS[base][0]}, not a histogram"
            return base, {"ModelName", *METRICS[base][2]} | IMPLICIT_LABELS
    assert series in METRICS, f"{series} is not an exported metric (known: {sorted(METRICS)})"
    kind = METRICS[series][0]
    assert kind != "histogram", f"{series} is a histogram: query its _bucket/_count/_sum series"
    return series, {"ModelName", *METRICS[series][2]} | IMPLICIT_LABELS


@pytest.mark.parametrize("expr", QUERIES)
def test_every_query_names_exported_metrics_with_their_labels(expr):
    selectors = _selectors(expr)
    assert selectors, f"no metric in {expr!r}"
    for series, matched, grouped in selectors:
        _, labels = _resolve(series)
        assert matched <= labels, f"{series} has no label(s) {matched - labels} in {expr!r}"
        assert grouped <= labels | {"le"}, f"{series}: grouped by {grouped - labels} it does not have"


def test_every_hetserve_metric_is_on_the_dashboard():
    graphed = {_resolve(series)[0] for expr in QUERIES for series, _, _ in _selectors(expr)}
    assert set(METRICS) <= graphed, f"not graphed: {sorted(set(METRICS) - graphed)}"


def test_histograms_are_read_as_quantiles_and_panels_are_well_formed():
    quantiles = [q for q in QUERIES if "histogram_quantile" in q]
    assert any("HetserveStageRunSeconds_bucket" in q for q in quantiles)
    assert any("HetserveQueueWaitSeconds_bucket" in q for q in quantiles)
    ids = [p["id"] for p in DASH["panels"]]
    assert len(ids) == len(set(ids))
    for panel in DASH["panels"]:
        assert panel["title"] and panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
