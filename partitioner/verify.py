"""Evidence that the stages compute the model: inputs in each input's valid range, outputs
compared with relative + absolute tolerance, and a refusal when the evidence proves nothing.

Random inputs are drawn per dtype and range: integer inputs that index an embedding table get
ids below its row count (the vocabulary), inputs named like masks get {0, 1}, floats N(0, 1).
An output that is all ~0 or constant on those inputs makes any comparison pass, so it is refused
(HF's random init leaves MobileNetV2's logits ~1e-21 and EfficientNet's at exactly 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from handlers.artifact.manifest import TensorSpec

RTOL = 1e-3  # stages vs torch: float32 kernels fused differently, summed in another order
ATOL_OF_SCALE = 1e-4  # absolute part, as a share of the output's largest magnitude
DEGENERATE_SCALE = 1e-6
DEFAULT_INT_RANGE = (0, 2)


class EvidenceError(ValueError):
    """The verification inputs give outputs that cannot tell a right model from a wrong one."""


@dataclass(frozen=True)
class Comparison:
    max_abs_err: float
    worst: float  # max over elements of |got - want| / (atol + rtol * |want|); <= 1 passes
    scale: float  # the largest |want|


def integer_ranges(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """[low, high) for each integer input: below the rows of the embedding table it indexes
    (``Gather(table, ids)``, possibly through a Cast), {0, 1} for masks, else {0, 1}."""
    initializers = {t.name: t for t in model.graph.initializer}
    aliases: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in ("Cast", "Identity", "Unsqueeze", "Reshape") and node.input:
            aliases[node.output[0]] = aliases.get(node.input[0], node.input[0])
    ranges: dict[str, tuple[int, int]] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in initializers:
            source = aliases.get(node.input[1], node.input[1])
            rows = int(initializers[node.input[0]].dims[0]) if initializers[node.input[0]].dims else 0
            if rows > 0:
                low, high = ranges.get(source, (0, rows))
                ranges[source] = (0, min(high, rows))
    out = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        elem = value.type.tensor_type.elem_type
        if elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                    onnx.TensorProto.BFLOAT16):
            continue
        if "mask" in value.name.lower():
            out[value.name] = (0, 2)
        else:
            out[value.name] = ranges.get(value.name, DEFAULT_INT_RANGE)
    return out


def draw_inputs(
    specs: Sequence[TensorSpec],
    batch: int,
    rng: np.random.Generator,
    dim_sizes: Mapping[int | str, int] | None = None,
    ranges: Mapping[str, tuple[int, int]] | None = None,
    symbols: Mapping[str, Mapping[int, str]] | None = None,
) -> dict[str, np.ndarray]:
    """A batch per input spec; a dynamic dim takes its symbol's size from ``dim_sizes``."""
    feeds = {}
    for spec in specs:
        shape = [batch]
        for axis, dim in enumerate(spec.sample_shape, start=1):
            if dim is not None:
                shape.append(dim)
                continue
            symbol = (symbols or {}).get(spec.name, {}).get(axis)
            shape.append(int((dim_sizes or {}).get(symbol, 1)) if symbol else 1)
        if spec.dtype.startswith("float"):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == "bool":
            feeds[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            low, high = (ranges or {}).get(spec.name, DEFAULT_INT_RANGE)
            feeds[spec.name] = rng.integers(low, max(high, low + 1), shape).astype(spec.dtype)
    return feeds


def check_evidence(outputs: Mapping[str, np.ndarray], source: str) -> dict[str, float]:
    """Each output's scale (largest magnitude); ``EvidenceError`` when one is ~0 or constant."""
    scales = {}
    for name, value in outputs.items():
        values = np.asarray(value, dtype=np.float64)
        if values.size == 0:
            continue
        scale = float(np.max(np.abs(values)))
        spread = float(np.ptp(values))
        if scale < DEGENERATE_SCALE or spread <= DEGENERATE_SCALE * scale:
            what = f"all ~0 (largest magnitude {scale:.3g})" if scale < DEGENERATE_SCALE else (
                f"constant ({float(values.flat[0]):.6g} everywhere)"
            )
            raise EvidenceError(
                f"{source}: output {name!r} is {what} on the verification inputs, so comparing "
                "the stages with it would prove nothing. This happens with randomly initialised "
                "weights (e.g. Hugging Face's init of MobileNetV2 and EfficientNet heads): load "
                "trained weights with --weights, or re-initialise the model in its factory "
                "(torch.nn.init.normal_(p, std=0.05) for each parameter); check too that the "
                "example inputs are in the model's range."
            )
        scales[name] = scale
    return scales


def compare(got: np.ndarray, want: np.ndarray, rtol: float = RTOL,
            atol_of_scale: float = ATOL_OF_SCALE) -> Comparison:
    want64 = np.asarray(want, dtype=np.float64)
    got64 = np.asarray(got, dtype=np.float64)
    if got64.shape != want64.shape:
        return Comparison(float("inf"), float("inf"), 0.0)
    if want64.size == 0:
        return Comparison(0.0, 0.0, 0.0)
    scale = float(np.max(np.abs(want64)))
    diff = np.abs(got64 - want64)
    bound = atol_of_scale * max(scale, DEGENERATE_SCALE) + rtol * np.abs(want64)
    return Comparison(float(diff.max()), float((diff / bound).max()), scale)


def other_sizes(sizes: Mapping[str, int], bounds: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """A second setting of every dynamic dim, to verify the stages away from the
    representative one: half of it (at least 2), inside the bounds."""
    out = {}
    for symbol, size in sizes.items():
        low, high = bounds.get(symbol, (1, 1 << 31))
        other = max(2, size // 2) if size > 2 else size + 1
        out[symbol] = min(max(other, low), high)
    return out
