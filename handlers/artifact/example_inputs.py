"""The one way hetserve makes example inputs: profiling, the export check, verification, the
archive's load check and the runtime's calibration all draw their inputs here.

Each input is drawn from the range its ``TensorSpec`` records (``values``; derived offline from
the graph by ``partitioner.value_ranges`` and stored in the manifest): integers in [low, high)
(an id below the rows of the smallest table it indexes, a mask in {0, 1}), floats uniform in
[low, high); a float without a range is standard normal. An archive written before ranges were
recorded gets ``SAFE_INTEGERS`` for its integer inputs: 0 and 1 index every table (BERT's token
type embedding has 2 rows; a 1-row table such as RoBERTa's is recorded, so never needs it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from handlers.artifact.manifest import TensorSpec, ValueRange

SAFE_INTEGERS = ValueRange(0, 2)


def draw(
    dtype: str, shape: Sequence[int], values: ValueRange | None, rng: np.random.Generator
) -> np.ndarray:
    """One array of ``dtype`` and ``shape`` with values from ``values`` (see the module doc)."""
    kind = np.dtype(dtype)
    if kind == np.bool_:
        return rng.integers(0, 2, tuple(shape)).astype(bool)
    if values is None:
        if np.issubdtype(kind, np.floating):
            return rng.standard_normal(tuple(shape)).astype(kind)
        values = SAFE_INTEGERS
    if values.integers:
        low, high = int(values.low), int(values.high)
        if not np.issubdtype(kind, np.floating):  # a range wider than the dtype is clipped to it
            info = np.iinfo(kind)
            low, high = max(low, int(info.min)), min(high, int(info.max) + 1)
        return rng.integers(low, max(high, low + 1), tuple(shape)).astype(kind)
    return rng.uniform(values.low, values.high, tuple(shape)).astype(kind)


def example_shape(
    spec: TensorSpec,
    batch: int,
    dim_sizes: Mapping[str, int] | None = None,
    axes: Mapping[str, Mapping[int, str]] | None = None,
) -> tuple[int, ...]:
    """``spec``'s shape at ``batch``: a dynamic dim takes its symbol's size from ``dim_sizes``
    (symbols per input and axis in ``axes``, as ``DynamicDims.axes``), else 1."""
    shape = [batch]
    named = (axes or {}).get(spec.name, {})
    for axis, dim in enumerate(spec.sample_shape, start=1):
        if dim is None:
            symbol = named.get(axis)
            dim = int((dim_sizes or {}).get(symbol, 1)) if symbol else 1
        shape.append(dim)
    return tuple(shape)


def example_feeds(
    specs: Sequence[TensorSpec],
    batch: int,
    rng: np.random.Generator,
    dim_sizes: Mapping[str, int] | None = None,
    axes: Mapping[str, Mapping[int, str]] | None = None,
) -> dict[str, np.ndarray]:
    """A batch for every spec, each drawn from its recorded range (``draw``)."""
    return {
        spec.name: draw(spec.dtype, example_shape(spec, batch, dim_sizes, axes), spec.values, rng)
        for spec in specs
    }
