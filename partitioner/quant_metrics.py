"""How close int8 stages come to the float model, and which quantization method to keep.

Pure functions of arrays and numbers (no ONNX Runtime): the accuracy of one variant against the
float reference on held-out inputs, the gate it must pass, which inputs are held out, and the
choice between static QDQ and dynamic quantization from their measured accuracy and speed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from handlers.artifact.manifest import TensorSpec

TOP1 = "top1_agreement"
COSINE = "cosine_mean"
DEFAULT_MIN_ACCURACY = 0.99
HELD_OUT_EVERY = 4  # one input in four is held out to measure accuracy, never calibrated on

Outputs = Mapping[str, np.ndarray]


def is_class_scores(spec: TensorSpec) -> bool:
    """A (batch, classes) float output: its argmax is a prediction, so top-1 agreement applies."""
    return (
        spec.dtype.startswith("float")
        and len(spec.shape) == 2
        and (spec.shape[1] is None or spec.shape[1] >= 2)
    )


CLASS_SCORE_WORDS = ("logit", "score", "prob", "class")


def is_classifier(outputs: Sequence[TensorSpec], labelled: bool) -> bool:
    """Class scores out: a (batch, classes) output, and the archive names labels or the output
    is named like scores (an embedding is (batch, dims) too, and its argmax means nothing)."""
    return any(
        is_class_scores(s) and (labelled or any(w in s.name.lower() for w in CLASS_SCORE_WORDS))
        for s in outputs
    )


@dataclass(frozen=True)
class Accuracy:
    """One variant against the float model on the same held-out inputs (worst output)."""

    samples: int
    metric: str  # TOP1 or COSINE: the number the threshold applies to
    value: float
    top1_agreement: float | None  # None: no class-score output
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_diff_of_largest: float  # max_abs_diff / the largest |float output|
    cosine_min: float
    cosine_mean: float

    def to_json(self) -> dict[str, float | int | str | None]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def measure(
    reference: Sequence[Outputs],
    candidate: Sequence[Outputs],
    outputs: Sequence[TensorSpec],
    classifier: bool,
) -> Accuracy:
    """``candidate[i]`` against ``reference[i]`` (the float model's outputs on input i).
    Classifiers are judged by top-1 agreement, everything else by mean cosine similarity."""
    if not reference or len(reference) != len(candidate):
        raise ValueError("need the same non-zero number of reference and candidate runs")
    metric = TOP1 if classifier else COSINE
    top1: list[float] = []
    cos_mean: list[float] = []
    cos_min, max_diff, max_rel, diff_sum, count, rows = 1.0, 0.0, 0.0, 0.0, 0, 0
    for spec in outputs:
        want = np.concatenate([np.asarray(r[spec.name], np.float64) for r in reference])
        got = np.concatenate([np.asarray(c[spec.name], np.float64) for c in candidate])
        if want.shape != got.shape:
            raise ValueError(f"output {spec.name!r}: shape {got.shape}, the float model's {want.shape}")
        rows = want.shape[0]
        diff = np.abs(got - want)
        if diff.size:
            max_diff = max(max_diff, float(diff.max()))
            max_rel = max(max_rel, float(diff.max()) / max(float(np.abs(want).max()), 1e-12))
            diff_sum, count = diff_sum + float(diff.sum()), count + diff.size
        cosines = row_cosines(want.reshape(rows, -1), got.reshape(rows, -1))
        cos_min = min(cos_min, float(cosines.min(initial=1.0)))
        cos_mean.append(float(cosines.mean()) if cosines.size else 1.0)
        if classifier and is_class_scores(spec):
            top1.append(float(np.mean(want.argmax(-1) == got.argmax(-1))))
    top1_value = min(top1) if top1 else None
    cosine = min(cos_mean, default=1.0)
    return Accuracy(
        samples=rows,
        metric=metric,
        value=top1_value if metric == TOP1 and top1_value is not None else cosine,
        top1_agreement=top1_value,
        max_abs_diff=max_diff,
        mean_abs_diff=diff_sum / count if count else 0.0,
        max_abs_diff_of_largest=max_rel,
        cosine_min=cos_min,
        cosine_mean=cosine,
    )


def row_cosines(want: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Cosine similarity per row; two zero rows agree (1), a zero row against a non-zero one
    does not (0)."""
    dot = np.sum(want * got, axis=1)
    norms = np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1)
    both_zero = (np.linalg.norm(want, axis=1) == 0) & (np.linalg.norm(got, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, out)


def held_out_indices(count: int, every: int = HELD_OUT_EVERY) -> tuple[list[int], list[int]]:
    """(calibrate on, held out): every ``every``-th input, starting with the first, is held out;
    needs two inputs (one of each)."""
    if count < 2:
        raise ValueError(f"{count} input(s): need at least 2, one to calibrate on and one held out")
    held = [i for i in range(count) if i % every == 0]
    return [i for i in range(count) if i % every != 0], held


@dataclass(frozen=True)
class Candidate:
    """One quantization method tried on the whole model."""

    method: str
    accuracy: Accuracy
    speedup: float  # float32 time / this method's time, same inputs, same process


@dataclass(frozen=True)
class Choice:
    method: str
    reason: str


def choose_method(candidates: Sequence[Candidate], min_accuracy: float) -> Choice:
    """The fastest method that meets ``min_accuracy``; if none does, the most accurate one."""
    if not candidates:
        raise ValueError("no quantization method to choose from")
    passing = [c for c in candidates if c.accuracy.value >= min_accuracy]
    others = ", ".join(
        f"{c.method} {c.accuracy.metric} {c.accuracy.value:.4f} at {c.speedup:.2f}x"
        for c in candidates
    )
    if passing:
        best = max(passing, key=lambda c: (c.speedup, c.accuracy.value))
        why = "the fastest" if len(passing) > 1 else "the only one"
        return Choice(best.method, f"{why} of the methods meeting {best.accuracy.metric} >= "
                                   f"{min_accuracy:g} (tried: {others})")
    best = max(candidates, key=lambda c: (c.accuracy.value, c.speedup))
    return Choice(best.method, f"no method meets {best.accuracy.metric} >= {min_accuracy:g}; "
                               f"the most accurate (tried: {others})")


@dataclass(frozen=True)
class Verdict:
    """The gate over every variant: ``(label, accuracy)`` pairs, worst first."""

    passed: bool
    failures: tuple[tuple[str, Accuracy], ...]

    def line(self, min_accuracy: float) -> str:
        """One line saying by how much the worst variant misses the threshold."""
        label, worst = self.failures[0]
        more = f" (and {len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
        return (
            f"int8 {label}: {worst.metric} {worst.value:.4f} on {worst.samples} held-out inputs "
            f"is {min_accuracy - worst.value:.4f} below --min-accuracy {min_accuracy:g}{more}; "
            "calibrate on more or better data (--calibration DIR), or pass --allow-accuracy-loss "
            "to archive it anyway"
        )


def judge(variants: Sequence[tuple[str, Accuracy]], min_accuracy: float) -> Verdict:
    failures = sorted(
        ((label, acc) for label, acc in variants if acc.value < min_accuracy),
        key=lambda item: item[1].value,
    )
    return Verdict(not failures, tuple(failures))
