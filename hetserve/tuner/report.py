"""The study's report: values per trial, the gain over the shipped default, and which knobs
mattered (optuna's PED-ANOVA and a plain one-way ANOVA per knob)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from hetserve.tuner.space import Libraries
from hetserve.tuner.study import TuneOptions


def main_effects(rows: Sequence[tuple[Mapping[str, Any], float]]) -> dict[str, dict]:
    """Per knob: mean objective per value, and the share of the objective's variance those
    means explain (eta squared, a one-way ANOVA per knob). Plain, and readable with few trials."""
    values = [v for _, v in rows]
    if len(values) < 2:
        return {}
    grand = sum(values) / len(values)
    total = sum((v - grand) ** 2 for v in values)
    out = {}
    for knob in rows[0][0]:
        groups: dict[str, list[float]] = {}
        for params, v in rows:
            groups.setdefault(json.dumps(params[knob]), []).append(v)
        between = sum(len(g) * (sum(g) / len(g) - grand) ** 2 for g in groups.values())
        out[knob] = {
            "eta_squared": between / total if total > 0 else 0.0,
            "values_tried": len(groups),
            "mean_by_value": {k: {"mean": sum(g) / len(g), "trials": len(g)} for k, g in groups.items()},
        }
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["eta_squared"]))


def study_report(study, options: TuneOptions, space: Mapping[str, tuple], libraries: Libraries | None = None) -> dict:
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    measured = [t for t in done if not t.user_attrs.get("repeat_of_measured")]
    default = next((t for t in done if t.user_attrs.get("role") == "shipped default"), None)
    try:
        importance = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        importance_note = "optuna PED-ANOVA over the completed trials"
    except Exception as exc:  # noqa: BLE001 - too few or too uniform trials: say so, keep the report
        importance, importance_note = {}, f"PED-ANOVA not computable: {exc}"
    best = study.best_trial if done else None
    maximize = options.objective != "p99"
    gain = None
    if best is not None and default is not None and default.value:
        gain = best.value / default.value if maximize else default.value / best.value
    return {
        "objective": options.objective, "rate": options.rate, "criteria": asdict(options.criteria),
        "options": {k: v for k, v in asdict(options).items() if k != "criteria"},
        "space": {k: list(v) for k, v in space.items()},
        "libraries": asdict(libraries) if libraries else None,
        "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                    **t.user_attrs} for t in study.trials],
        "default": {"value": default.value, "params": _config(default)} if default else None,
        "best": {"number": best.number, "value": best.value, "params": _config(best)} if best else None,
        "gain_over_default": gain,
        "importance": {"ped_anova": importance, "note": importance_note,
                       "main_effects": main_effects([(_config(t), t.value) for t in measured])},
        "counts": {state: sum(t.state.name == state for t in study.trials) for state in ("COMPLETE", "PRUNED", "FAIL")},
    }


def _config(trial) -> dict[str, Any]:
    """What a trial measured: its canonical configuration (its raw params name the same one)."""
    return trial.user_attrs.get("config", trial.params)


def report_markdown(report: dict) -> str:
    unit = {"max-rate": "req/s", "goodput": "ok/s"}.get(report["objective"], "ms p99")
    lines = [f"# hetserve tune: {report['objective']} (p99 target {report['criteria']['p99_ms']:g} ms)", ""]
    if report["default"] and report["best"]:
        gain = report["gain_over_default"]
        lines += [f"shipped default: **{report['default']['value']:.1f} {unit}**; best (trial "
                  f"{report['best']['number']}): **{report['best']['value']:.1f} {unit}**; gain "
                  f"**{gain:.2f}x**" if gain else "gain: n/a", ""]
    lines += ["| trial | state | value | " + " | ".join(report["space"]) + " |",
              "|---|---|---|" + "---|" * len(report["space"])]
    for t in report["trials"]:
        value = "-" if t["value"] is None or t["state"] != "COMPLETE" else f"{t['value']:.1f}"
        lines.append(f"| {t['number']} | {t['state'].lower()} | {value} | "
                     + " | ".join(str(t["params"].get(k, "")) for k in report["space"]) + " |")
    measured = sum(t["state"] == "COMPLETE" and not t.get("repeat_of_measured") for t in report["trials"])
    lines += ["", f"Knob importance over the {measured} completed, measured trials (PED-ANOVA; eta^2 = share of "
              "the objective's variance explained by the knob's main effect). With few trials, knobs that "
              "always changed together share the credit: read eta^2 with the values-tried column.", "",
              "| knob | PED-ANOVA | eta^2 | values tried |", "|---|---|---|---|"]
    effects = report["importance"]["main_effects"]
    for knob in report["space"]:
        ped = report["importance"]["ped_anova"].get(knob)
        eff = effects.get(knob, {})
        lines.append(f"| {knob} | {'-' if ped is None else f'{ped:.3f}'} | "
                     f"{eff.get('eta_squared', 0):.3f} | {eff.get('values_tried', 0)} |")
    if report.get("libraries"):
        lines += ["", *[f"- {n}" for n in report["libraries"]["notes"]]]
    return "\n".join(lines) + "\n"
