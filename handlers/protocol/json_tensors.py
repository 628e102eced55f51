"""JSON number lists <-> numpy arrays: shared by the plain JSON codec and KServe v2's "data".

Standard library + numpy only: this module runs inside TorchServe workers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from handlers.protocol.validation import BAD_REQUEST, RequestError, all_finite, check_element_budget

# Python types JSON numbers may arrive as, per numpy dtype kind (bool is not an int here).
_JSON_TYPES_BY_KIND = {"f": (int, float), "i": (int,), "u": (int,), "b": (bool,)}
_JSON_TYPE_NAMES = {
    str: "a string",
    bool: "a boolean",
    float: "a non-integer number",
    int: "an integer",
    type(None): "null",
    dict: "an object",
    list: "a nested list (the lists are ragged)",
}


def nested_to_array(
    value: Any, name: str, dtype: np.dtype, max_rank: int, budget: int
) -> np.ndarray:
    """Nested JSON lists -> array of ``dtype``: rectangular, right element types, within budget.

    The shape is read along the first elements, its size checked against ``budget``, and every
    list checked (iteratively) before numpy allocates anything.
    """
    shape: list[int] = []
    node = value
    while isinstance(node, list):
        if len(shape) == max_rank:
            raise RequestError(
                BAD_REQUEST, f"input {name!r}: lists nested more than {max_rank} levels deep"
            )
        shape.append(len(node))
        if not node:
            break
        node = node[0]
    check_element_budget(name, math.prod(shape), budget)
    _check_nested(value, shape, name, dtype)
    return _build(value, name, dtype)


def _check_nested(value: Any, shape: list[int], name: str, dtype: np.dtype) -> None:
    allowed = _JSON_TYPES_BY_KIND[dtype.kind]
    level = [value]
    for depth, size in enumerate(shape):
        next_level: list[Any] = []
        for node in level:
            if type(node) is not list or len(node) != size:
                raise RequestError(BAD_REQUEST, f"input {name!r}: the nested lists are ragged")
            if depth + 1 < len(shape):
                next_level.extend(node)
        if depth + 1 == len(shape):
            leaves = [item for node in level for item in node] if len(level) > 1 else level[0]
            found = set(map(type, leaves))
            if not found.issubset(allowed):
                _bad_leaf(name, dtype, found - set(allowed))
        level = next_level
    if not shape and type(value) not in allowed:
        _bad_leaf(name, dtype, {type(value)})


def _bad_leaf(name: str, dtype: np.dtype, found: set[type]) -> None:
    wanted = {"f": "numbers", "i": "integers", "u": "integers", "b": "booleans"}[dtype.kind]
    # A list where a number belongs means one row is nested deeper than the first one.
    kind = list if list in found else sorted(found, key=lambda t: t.__name__)[0]
    described = _JSON_TYPE_NAMES.get(kind, "an unsupported value")
    raise RequestError(
        BAD_REQUEST, f"input {name!r}: expected {wanted} for {dtype.name}, found {described}"
    )


def _build(value: Any, name: str, dtype: np.dtype) -> np.ndarray:
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            if dtype.kind in "iu":
                # Through int64 first: numpy 1.x wraps out-of-range ints silently, 2.x raises.
                wide = np.array(value, dtype=np.uint64 if dtype == np.uint64 else np.int64)
                info = np.iinfo(dtype)
                if wide.size and (wide.min() < info.min or wide.max() > info.max):
                    raise OverflowError
                return wide.astype(dtype)
            return np.array(value, dtype=dtype)
    except OverflowError:
        raise RequestError(
            BAD_REQUEST, f"input {name!r}: a value is out of range for {dtype.name}"
        ) from None


def json_list(array: np.ndarray) -> Any:
    """Nested lists; NaN/inf become null because standard JSON has no token for them."""
    if all_finite(array):
        return array.tolist()
    as_objects = array.astype(object)
    as_objects[~np.isfinite(array)] = None
    return as_objects.tolist()
