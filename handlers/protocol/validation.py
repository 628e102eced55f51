"""Checks every request format shares: input names, shapes, batch, dtype rules and size limits.

Anything a client can get wrong raises ``RequestError``. Its message is safe to send back as is:
it names the input and the problem, never a path or a traceback, and clips whatever it echoes
from the request.

Dtype rule (all formats): a tensor is accepted in the spec's dtype, or in a dtype numpy casts
"safely" to it, except that bool never converts to or from a number and an integer converts to
a float only when the float's mantissa holds every value (int8/uint8 -> float16, up to 16-bit
-> float32, up to 32-bit -> float64). So int32 -> int64, float16 -> float32 and uint8 -> float32
pass; float -> int, int64 -> float32/float64, float64 -> float32 and bool -> float are refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

# Re-exported: the codecs and processors raise and clip through this module.
from handlers.errors import RequestError as RequestError
from handlers.errors import clip as clip

if TYPE_CHECKING:
    from handlers.artifact.manifest import TensorSpec

BAD_REQUEST = 400
PAYLOAD_TOO_LARGE = 413
UNSUPPORTED_MEDIA_TYPE = 415

# json's C scanner recurses once per nesting level; stay far below the interpreter's limit.
JSON_DEPTH_CEILING = 200


@dataclass(frozen=True)
class RequestLimits:
    """Per-request ceilings, checked before anything proportional to the claim is allocated."""

    max_body_bytes: int = 32 * 2**20
    max_elements: int = 2**24  # summed over all inputs of one request
    max_batch_per_request: int = 64
    # Mirrors TorchServe's max_response_size (config.properties): a larger answer would cost the
    # worker its life, so it is refused with a 413 instead (handlers/response_size.py).
    max_response_bytes: int = 16 * 2**20
    max_json_depth: int = 32  # a KServe v2 body for a rank-4 tensor needs 7
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.name == "allow_nonfinite":
                if not isinstance(value, bool):
                    raise ValueError(f"RequestLimits.allow_nonfinite must be a bool, got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RequestLimits.{spec.name} must be an int >= 1, got {value!r}")
        if self.max_json_depth > JSON_DEPTH_CEILING:
            raise ValueError(
                f"RequestLimits.max_json_depth must be <= {JSON_DEPTH_CEILING}, "
                f"got {self.max_json_depth}"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> RequestLimits:
        """Limits from a config section (e.g. model-config.yaml); unknown keys are an error."""
        known = {spec.name for spec in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown request limit(s) {unknown}; known: {sorted(known)}")
        return cls(**values)  # type: ignore[arg-type]


def quoted(value: object) -> str:
    """A client-supplied value as it may appear in a message: repr'd, then clipped."""
    return clip(repr(value))


def format_shape(shape: Iterable[int | str | None]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def spec_shape_text(spec: TensorSpec) -> str:
    """The spec's shape as clients read it: ``[N,3,224,224]`` (``?`` marks other dynamic dims)."""
    batch = "N" if spec.shape[0] is None else spec.shape[0]
    return format_shape((batch, *spec.sample_shape))


def name_list(names: Iterable[str]) -> str:
    return clip(", ".join(repr(n) for n in names), 200)


def rank_error(spec: TensorSpec, got: Sequence[int]) -> RequestError:
    return RequestError(
        BAD_REQUEST,
        f"input {spec.name!r}: expected shape {spec_shape_text(spec)} or "
        f"{format_shape(spec.sample_shape)}, got {clip(format_shape(got))}",
    )


def check_names(given: Iterable[str], specs: Sequence[TensorSpec], note: str = "") -> None:
    """Unknown names first (the likelier typo), then missing ones; ``note`` explains a format."""
    expected = [spec.name for spec in specs]
    given = list(given)
    for name in given:
        if name not in expected:
            raise RequestError(
                BAD_REQUEST,
                f"unknown input {quoted(name)}; the model's inputs are {name_list(expected)}",
            )
    for name in expected:
        if name not in given:
            raise RequestError(
                BAD_REQUEST,
                f"missing input {name!r}{note}; the model's inputs are {name_list(expected)}",
            )


def check_element_budget(name: str, count: int, budget: int) -> None:
    """Refuse a claimed element count before allocating it (``budget``: what the request has left)."""
    if count > budget:
        raise RequestError(
            PAYLOAD_TOO_LARGE,
            f"input {name!r}: {clip(str(count))} elements exceed the request limit "
            f"(at most {budget} more allowed)",
        )


def check_cast(name: str, source: np.dtype, target: np.dtype) -> None:
    """The module docstring's dtype rule; raises 400 naming both dtypes when refused."""
    if source == target:
        return
    lossless_int_to_float = not (
        source.kind in "iu" and target.kind == "f" and source.itemsize >= target.itemsize
    )
    if (
        source.kind != "b"
        and target.kind != "b"
        and lossless_int_to_float
        and np.can_cast(source, target, casting="safe")
    ):
        return
    raise RequestError(
        BAD_REQUEST,
        f"input {name!r}: {source.name} cannot be converted to {target.name} without loss; "
        f"send {target.name}",
    )


def all_finite(array: np.ndarray) -> bool:
    if array.dtype.kind != "f" or array.size == 0:
        return True
    # min/max propagate NaN and expose +-inf without allocating a mask the size of the input.
    with np.errstate(invalid="ignore"):
        return bool(np.isfinite(array.min()) and np.isfinite(array.max()))


def check_shape(spec: TensorSpec, shape: Sequence[int], limits: RequestLimits) -> bool:
    """Check a (claimed) shape against the spec; returns whether it includes the batch dim.

    Works on the shape alone so decoders can refuse a claim before building any array.
    """
    sample = spec.sample_shape
    if len(shape) not in (len(sample), len(sample) + 1):
        raise rank_error(spec, shape)
    had_batch_dim = len(shape) == len(sample) + 1
    batched = tuple(shape) if had_batch_dim else (1, *shape)
    for want, got in zip(spec.shape, batched, strict=True):
        if want is not None and want != got:
            expected = spec_shape_text(spec) if had_batch_dim else format_shape(sample)
            raise RequestError(
                BAD_REQUEST,
                f"input {spec.name!r}: expected shape {expected}, got {clip(format_shape(shape))}",
            )
    if batched[0] == 0:
        raise RequestError(BAD_REQUEST, f"input {spec.name!r}: the batch is empty (batch dim 0)")
    if 0 in batched:
        # ONNX Runtime accepts zero-size tensors silently and models rarely mean them.
        raise RequestError(
            BAD_REQUEST,
            f"input {spec.name!r}: zero-size dimension in shape {clip(format_shape(shape))}",
        )
    if batched[0] > limits.max_batch_per_request:
        raise RequestError(
            PAYLOAD_TOO_LARGE,
            f"input {spec.name!r}: batch of {clip(str(batched[0]))} exceeds the limit of "
            f"{limits.max_batch_per_request} per request",
        )
    return had_batch_dim


def conform_shape(
    array: np.ndarray, spec: TensorSpec, limits: RequestLimits
) -> tuple[np.ndarray, bool]:
    """``array`` viewed with a leading batch dim, and whether the client sent that dim."""
    had_batch_dim = check_shape(spec, array.shape, limits)
    return (array if had_batch_dim else array.reshape((1, *array.shape))), had_batch_dim


def to_spec_dtype(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Cast (by the dtype rule) to the spec's native dtype, C-contiguous and aligned."""
    target = np.dtype(spec.dtype)
    check_cast(spec.name, array.dtype, target)
    out = array.astype(target, copy=False)
    if not (out.flags.c_contiguous and out.flags.aligned):
        out = np.array(out, order="C")
    return out


def validate_inputs(
    candidates: Mapping[str, np.ndarray],
    specs: Sequence[TensorSpec],
    limits: RequestLimits,
    note: str = "",
) -> tuple[dict[str, np.ndarray], int, bool]:
    """Decoded tensors -> (arrays in spec order, batch, had_batch_dim), or ``RequestError``.

    Shapes and limits are checked for every input before any of them is cast or copied.
    """
    check_names(candidates.keys(), specs, note)
    shaped = {spec.name: conform_shape(candidates[spec.name], spec, limits) for spec in specs}
    batches = {name: array.shape[0] for name, (array, _) in shaped.items()}
    if len(set(batches.values())) > 1:
        listed = ", ".join(f"{name!r} has {b}" for name, b in batches.items())
        raise RequestError(BAD_REQUEST, f"inputs disagree on the batch size: {clip(listed, 200)}")
    flags = {name: had for name, (_, had) in shaped.items()}
    if len(set(flags.values())) > 1:
        with_dim = [name for name, had in flags.items() if had]
        without = [name for name, had in flags.items() if not had]
        raise RequestError(
            BAD_REQUEST,
            f"inputs disagree on the batch dimension: {name_list(with_dim)} have one, "
            f"{name_list(without)} do not",
        )
    total = sum(math.prod(array.shape) for array, _ in shaped.values())
    if total > limits.max_elements:
        raise RequestError(
            PAYLOAD_TOO_LARGE,
            f"request has {total} elements, the limit is {limits.max_elements}",
        )
    arrays = {}
    for spec in specs:
        array = to_spec_dtype(shaped[spec.name][0], spec)
        if not limits.allow_nonfinite and not all_finite(array):
            raise RequestError(
                BAD_REQUEST,
                f"input {spec.name!r} contains NaN or infinity (or values beyond {spec.dtype} range)",
            )
        arrays[spec.name] = array
    (batch,) = set(batches.values())
    (had_batch_dim,) = set(flags.values())
    return arrays, batch, had_batch_dim
