"""Model scores -> {"label": score} JSON: optional softmax/sigmoid, then the top k by score.

Label names come from the archive's labels file (a JSON list, a JSON ``{"index": "name"}``
object such as Hugging Face's ``id2label``, or a text file with one name per line); a class
without a name is called by its index.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .config import LabelsConfig, ProcessorConfigError


def read_labels(path: Path, knob: str = "hetserve.processors.labels.labels") -> tuple[str, ...]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".json":
        return tuple(line.strip() for line in text.splitlines() if line.strip())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProcessorConfigError(f"{knob} {path.name!r} is not valid JSON: {exc.msg}") from None
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        return tuple(data)
    if isinstance(data, dict):
        try:
            indexed = {int(k): str(v) for k, v in data.items()}
        except (TypeError, ValueError):
            raise ProcessorConfigError(f"{knob} {path.name!r}: keys must be class indices") from None
        if indexed and min(indexed) >= 0:
            return tuple(indexed.get(i, str(i)) for i in range(max(indexed) + 1))
    raise ProcessorConfigError(
        f"{knob} {path.name!r} must be a JSON list of names or an object {{index: name}}"
    )


def activate(scores: np.ndarray, activation: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if activation == "softmax":
        shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
        softmax: np.ndarray = shifted / shifted.sum(axis=-1, keepdims=True)
        return softmax
    if activation == "sigmoid":
        sigmoid: np.ndarray = 1.0 / (1.0 + np.exp(-scores))
        return sigmoid
    return scores


def top_labels(
    scores: np.ndarray, config: LabelsConfig, names: Sequence[str]
) -> list[dict[str, float]]:
    """One ``{name: score}`` per row of ``scores`` (batch, classes), highest score first."""
    if scores.ndim != 2:
        scores = scores.reshape(scores.shape[0], -1)
    probabilities = activate(scores, config.activation)
    k = min(config.top_k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    rows = []
    for row, picks in zip(probabilities, order, strict=True):
        rows.append({_name(names, int(i)): float(row[i]) for i in picks})
    return rows


def _name(names: Sequence[str], index: int) -> str:
    return names[index] if index < len(names) and names[index] else str(index)
