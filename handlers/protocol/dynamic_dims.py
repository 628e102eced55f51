"""Dynamic axes beyond the batch: which input dims are free, their shared symbols and bounds.

A model may declare, say, ``input_ids:1=seq`` and ``attention_mask:1=seq``: both inputs take
any sequence length, but the same one within a request. The archive records the declaration
(``DynamicDims.to_json``) and the runtime checks every request with ``check_request`` before it
reaches a session: inputs sharing a symbol must agree and stay within its bounds. Pure data and
pure functions; the handler maps a ``DimError`` to a 400.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

BATCH = "batch"
_AXIS = re.compile(r"^([A-Za-z_][\w.\-/]*):(\d+)=([A-Za-z_]\w*)$")
_SIZE = re.compile(r"^([A-Za-z_]\w*)=(\d+)$")
_BOUND = re.compile(r"^([A-Za-z_]\w*)(<=|>=)(\d+)$")


class DimError(ValueError):
    """A declaration that does not parse, or a request whose dims break it."""


@dataclass(frozen=True)
class DynamicDims:
    """``axes``: input -> {axis: symbol}; ``sizes``: symbol -> representative size (profiling,
    pricing the cut); ``bounds``: symbol -> (min, max) accepted at run time."""

    axes: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    sizes: Mapping[str, int] = field(default_factory=dict)
    bounds: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        symbols = self.symbols
        for name, axes in self.axes.items():
            for axis, symbol in axes.items():
                if axis < 1:
                    raise DimError(f"{name}:{axis}: dim 0 is the batch; declare dims 1 and up")
                if symbol == BATCH:
                    raise DimError(f"{name}:{axis}: the symbol 'batch' is reserved for dim 0")
        # With no axes (an .onnx brings its own symbols), sizes and bounds are checked against
        # the file's symbols when they are read.
        for symbol in (*self.sizes, *self.bounds):
            if symbols and symbol not in symbols:
                raise DimError(f"{symbol!r} is not a declared dynamic dim (declared: {sorted(symbols)})")
        for symbol, (low, high) in self.bounds.items():
            if not 1 <= low <= high:
                raise DimError(f"{symbol}: bounds {low}..{high} are empty")
            size = self.sizes.get(symbol)
            if size is not None and not low <= size <= high:
                raise DimError(f"{symbol}={size} lies outside its bounds {low}..{high}")

    @property
    def symbols(self) -> frozenset[str]:
        return frozenset(s for axes in self.axes.values() for s in axes.values())

    def __bool__(self) -> bool:
        return bool(self.axes)

    def size_of(self, symbol: str, default: int | None = None) -> int | None:
        return self.sizes.get(symbol, default)

    def to_json(self) -> dict[str, Any]:
        return {
            "axes": {n: {str(a): s for a, s in sorted(ax.items())} for n, ax in sorted(self.axes.items())},
            "sizes": dict(sorted(self.sizes.items())),
            "bounds": {s: list(b) for s, b in sorted(self.bounds.items())},
        }

    @classmethod
    def from_json(cls, data: Any) -> DynamicDims:
        if not data:
            return cls()
        if not isinstance(data, Mapping):
            raise DimError("dynamic dims must be a JSON object")
        try:
            axes = {str(n): {int(a): str(s) for a, s in ax.items()} for n, ax in data.get("axes", {}).items()}
            sizes = {str(s): int(v) for s, v in data.get("sizes", {}).items()}
            bounds = {str(s): (int(b[0]), int(b[1])) for s, b in data.get("bounds", {}).items()}
        except (AttributeError, TypeError, ValueError, IndexError) as exc:
            raise DimError(f"malformed dynamic dims: {exc}") from None
        return cls(axes=axes, sizes=sizes, bounds=bounds)


def parse_declarations(
    dynamic: Iterable[str] = (), dims: Iterable[str] = ()
) -> DynamicDims:
    """``--dynamic input_ids:1=seq`` entries and ``--dim seq=128`` / ``--dim seq<=512`` ones."""
    axes: dict[str, dict[int, str]] = {}
    for text in dynamic:
        match = _AXIS.match(text.strip())
        if not match:
            raise DimError(f"--dynamic {text!r}: expected INPUT:AXIS=SYMBOL, e.g. input_ids:1=seq")
        name, axis, symbol = match.group(1), int(match.group(2)), match.group(3)
        if axis in axes.setdefault(name, {}):
            raise DimError(f"--dynamic declares {name}:{axis} twice")
        axes[name][axis] = symbol
    sizes: dict[str, int] = {}
    lows: dict[str, int] = {}
    highs: dict[str, int] = {}
    for text in dims:
        for part in text.split(","):
            part = part.strip()
            if match := _SIZE.match(part):
                sizes[match.group(1)] = int(match.group(2))
            elif match := _BOUND.match(part):
                target = highs if match.group(2) == "<=" else lows
                target[match.group(1)] = int(match.group(3))
            else:
                raise DimError(f"--dim {part!r}: expected SYMBOL=SIZE, SYMBOL<=MAX or SYMBOL>=MIN")
    bounds = {s: (lows.get(s, 1), highs.get(s, 1 << 31)) for s in {*lows, *highs}}
    return DynamicDims(axes=axes, sizes=sizes, bounds=bounds)


def check_request(dims: DynamicDims, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """The size of each symbol in one request; ``DimError`` naming the inputs that disagree or
    the bound that is broken. Inputs not in ``shapes`` are checked elsewhere (missing input)."""
    seen: dict[str, tuple[int, str]] = {}
    for name, axes in sorted(dims.axes.items()):
        shape = shapes.get(name)
        if shape is None:
            continue
        for axis, symbol in sorted(axes.items()):
            if axis >= len(shape):
                raise DimError(f"input {name!r} has {len(shape)} dims; dim {axis} ({symbol}) is missing")
            size = int(shape[axis])
            if symbol in seen and seen[symbol][0] != size:
                other_size, other = seen[symbol]
                raise DimError(
                    f"inputs {other!r} and {name!r} must agree on {symbol}: "
                    f"{other} has {other_size}, {name} dim {axis} has {size}"
                )
            seen[symbol] = (size, f"{name}")
            low, high = dims.bounds.get(symbol, (1, 1 << 31))
            if not low <= size <= high:
                raise DimError(
                    f"input {name!r} dim {axis} ({symbol}) is {size}; this model accepts "
                    f"{symbol} from {low} to {high}"
                )
    return {s: v[0] for s, v in seen.items()}


def check_dynamic_dims(dims: DynamicDims, arrays: Mapping[str, Any]) -> None:
    """``check_request`` for decoded arrays, as the handler's clear 400 (RequestError)."""
    if not dims:
        return
    try:
        check_request(dims, {name: tuple(a.shape) for name, a in arrays.items()})
    except DimError as exc:
        from handlers.protocol.validation import RequestError

        raise RequestError(400, str(exc)) from None
