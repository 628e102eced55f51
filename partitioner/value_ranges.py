"""Which values each model input may take, read from the ONNX graph (and the model's config where
the graph cannot tell), so every example run draws valid inputs (handlers.artifact.example_inputs).

An integer input is bounded by the smallest table it indexes: ``Gather(table, ids)``, where the
ids may reach the Gather through ops that keep their values (Cast, Reshape, Unsqueeze, Concat,
Slice...) and through ``Add``/``Sub`` of a constant (the bound shifts by it). A table is an
initializer, a ``Constant`` or any tensor whose gathered dim has a static size. Inputs named
like masks take {0, 1}. An integer input that indexes nothing gets {0, 1}, which every table
takes. A transformers config found on the module adds ``vocab_size``, ``type_vocab_size`` and
``max_position_embeddings`` for the inputs named as transformers names them; the export records
them in the graph's metadata (``record_hints``), so everything that only sees the ONNX graph
(profiling, the build) reads the same bounds.
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from handlers.artifact.example_inputs import SAFE_INTEGERS
from handlers.artifact.manifest import TensorSpec, ValueRange

HINTS_KEY = "hetserve.value_hints"
MASK = ValueRange(0, 2)
# Config fields that bound an input, by the input's name in transformers.
CONFIG_BOUNDS = {
    "input_ids": "vocab_size",
    "token_type_ids": "type_vocab_size",
    "position_ids": "max_position_embeddings",
}
# Ops whose output holds (some of) the values of their first input, or of every input (Concat).
_KEEP_VALUES = {
    "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand", "Transpose", "Slice",
    "Tile", "Split", "Cast",
}
_FLOATS = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


def derive_ranges(model: onnx.ModelProto) -> dict[str, ValueRange]:
    """The value range of every graph input that needs one (integers and float masks); floats
    without one are left out (drawn standard normal)."""
    hints = read_hints(model)
    bounds = _index_bounds(model)
    initializers = {t.name for t in model.graph.initializer}
    out: dict[str, ValueRange] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        elem = value.type.tensor_type.elem_type
        masklike = "mask" in value.name.lower()
        if elem in _FLOATS:
            if masklike:
                out[value.name] = MASK
            continue
        if elem == onnx.TensorProto.BOOL:
            continue
        found = _narrow(bounds.get(value.name), MASK if masklike else None)
        out[value.name] = _narrow(found, hints.get(value.name)) or SAFE_INTEGERS
    return out


def with_ranges(specs: Iterable[TensorSpec], ranges: Mapping[str, ValueRange]) -> tuple[TensorSpec, ...]:
    """``specs`` with each one's range from ``ranges`` (kept as is where it has none there)."""
    return tuple(
        TensorSpec(s.name, s.dtype, s.shape, ranges.get(s.name, s.values)) for s in specs
    )


def config_hints(module: Any, input_names: Iterable[str]) -> dict[str, ValueRange]:
    """Bounds a transformers config on ``module`` (or a submodule) gives the named inputs."""
    config = _find_config(module)
    hints = {}
    for name in input_names:
        size = getattr(config, CONFIG_BOUNDS.get(name, ""), None) if config is not None else None
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            hints[name] = ValueRange(0, size)
    return hints


def record_hints(model: onnx.ModelProto, hints: Mapping[str, ValueRange]) -> None:
    """Store ``hints`` in ``model``'s metadata (replacing any there), for ``derive_ranges``."""
    kept = [p for p in model.metadata_props if p.key != HINTS_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if hints:
        entry = model.metadata_props.add()
        entry.key = HINTS_KEY
        entry.value = json.dumps({name: r.to_json() for name, r in sorted(hints.items())})


def read_hints(model: onnx.ModelProto) -> dict[str, ValueRange]:
    for prop in model.metadata_props:
        if prop.key == HINTS_KEY:
            return {name: ValueRange.from_json(r) for name, r in json.loads(prop.value).items()}
    return {}


def _find_config(module: Any) -> Any:
    modules = module.modules() if hasattr(module, "modules") else [module]
    for candidate in modules:
        config = getattr(candidate, "config", None)
        if config is not None and any(hasattr(config, f) for f in CONFIG_BOUNDS.values()):
            return config
    return None


def _narrow(found: ValueRange | None, extra: ValueRange | None) -> ValueRange | None:
    """``found`` narrowed to ``extra`` as well (either may be missing); where the two do not
    overlap, ``found`` (what the graph says) wins."""
    if found is None or extra is None:
        return found or extra
    low, high = max(found.low, extra.low), min(found.high, extra.high)
    return ValueRange(low, high) if high > low else found


def _index_bounds(model: onnx.ModelProto) -> dict[str, ValueRange]:
    """Per graph input, [low, high) such that every table it reaches (shifted by the constants
    added on the way) is indexed inside its rows."""
    graph = model.graph
    constants = _constant_values(graph)
    static_dims = _static_dims(model)
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                readers[name].append(node)
    out: dict[str, ValueRange] = {}
    for value in graph.input:
        low, high = 0.0, float("inf")
        # (tensor, smallest and largest constant added to the input's values on the way)
        queue: deque[tuple[str, float, float]] = deque([(value.name, 0.0, 0.0)])
        seen: set[tuple[str, float, float]] = set()
        while queue and len(seen) < 10_000:
            state = queue.popleft()
            if state in seen:
                continue
            seen.add(state)
            tensor, shift_lo, shift_hi = state
            for node in readers.get(tensor, ()):
                rows = _rows_indexed(node, tensor, static_dims)
                if rows is not None:
                    low, high = max(low, -shift_lo), min(high, rows - shift_hi)
                for out_name, lo, hi in _carried(node, tensor, constants, shift_lo, shift_hi):
                    queue.append((out_name, lo, hi))
        if high != float("inf"):
            out[value.name] = ValueRange(low, max(high, low + 1))
    return out


def _rows_indexed(node: onnx.NodeProto, tensor: str, static_dims: Mapping[str, list[int | None]]) -> int | None:
    """The size of the dim ``tensor`` indexes when it is ``node``'s Gather indices."""
    if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] != tensor:
        return None
    dims = static_dims.get(node.input[0])
    if not dims:
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    axis = axis + len(dims) if axis < 0 else axis
    return dims[axis] if 0 <= axis < len(dims) else None


def _carried(
    node: onnx.NodeProto, tensor: str, constants: Mapping[str, np.ndarray], lo: float, hi: float
) -> list[tuple[str, float, float]]:
    """The tensors of ``node``'s outputs that hold ``tensor``'s values (shifted: new lo, hi)."""
    outputs = [o for o in node.output if o]
    op = node.op_type
    if op == "Cast" and _cast_target(node) == onnx.TensorProto.BOOL:
        return []
    if (op in _KEEP_VALUES and node.input[0] == tensor) or op == "Concat":
        return [(o, lo, hi) for o in outputs]
    if op == "Gather" and node.input[0] == tensor:  # gathered from: the values themselves move
        return [(o, lo, hi) for o in outputs]
    if op in ("Add", "Sub") and len(node.input) == 2:
        other = node.input[1] if node.input[0] == tensor else node.input[0]
        if other not in constants or (op == "Sub" and node.input[1] != other):
            return []
        c = constants[other]
        if c.size == 0 or not np.all(np.isfinite(c)):
            return []
        c_lo, c_hi = float(c.min()), float(c.max())
        if op == "Sub":
            c_lo, c_hi = -c_hi, -c_lo
        return [(o, lo + c_lo, hi + c_hi) for o in outputs]
    return []


def _cast_target(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant nodes small enough to read (shift constants are scalars)."""
    values = {}
    for tensor in graph.initializer:
        if int(np.prod(tensor.dims)) <= 1024:
            values[tensor.name] = numpy_helper.to_array(tensor)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and int(np.prod(attr.t.dims)) <= 1024:
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _static_dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """The dims of every tensor whose shape is known: initializers, Constants, value_info."""
    dims: dict[str, list[int | None]] = {}
    for info in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        shape = info.type.tensor_type.shape
        if info.type.tensor_type.HasField("shape"):
            dims[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    dims[node.output[0]] = list(attr.t.dims)
    for tensor in model.graph.initializer:
        dims[tensor.name] = list(tensor.dims)
    return dims
