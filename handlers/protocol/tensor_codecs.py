"""One tensor per body: raw little-endian bytes described by headers, and ``.npy`` files.

"raw" is ``application/octet-stream`` with X-Tensor-Shape ("1,3,224,224"), X-Tensor-Dtype
(default: the spec's) and X-Tensor-Name (default: the only input); "npy" is a .npy file
(NumPy magic first), whatever its content type. Both decode without copying and answer one
output: the only one, or the one named by X-Output-Name. Nothing sized by a client's claim is
allocated before the claim is checked against the body and the limits; a .npy header is read
without ever unpickling.
"""

from __future__ import annotations

import io
import math
import re
from typing import TYPE_CHECKING

import numpy as np

from handlers.protocol.body import RAW_CONTENT_TYPE, header, stamp
from handlers.protocol.codec import (
    BodyRequest,
    Codec,
    DecodedRequest,
    EncodedResponse,
    ResponseMeta,
)
from handlers.protocol.kserve_v2 import MAX_RANK, NUMPY_TO_V2, V2_TO_NUMPY, check_output_name
from handlers.protocol.npz_codec import DTYPE_HEADER, OUTPUT_HEADER, SHAPE_HEADER, described_raw
from handlers.protocol.validation import (
    BAD_REQUEST,
    RequestError,
    check_cast,
    check_element_budget,
    check_shape,
    clip,
    format_shape,
    name_list,
    quoted,
    validate_inputs,
)

if TYPE_CHECKING:
    from handlers.artifact.manifest import TensorSpec

FORMAT_RAW = "raw"
FORMAT_NPY = "npy"
NPY_CONTENT_TYPE = "application/x-npy"
NPY_CONTENT_TYPES = frozenset({NPY_CONTENT_TYPE, "application/npy"})
NPY_MAGIC = b"\x93NUMPY"
NAME_HEADER = "X-Tensor-Name"

# X-Tensor-Dtype accepts numpy names and v2 names, case-insensitively.
DTYPE_ALIASES = {**{n: n for n in NUMPY_TO_V2}, **{v2.lower(): n for v2, n in V2_TO_NUMPY.items()}}
MAX_HEADER_CHARS = 512
# A .npy header never exceeds numpy's own 10000-char cap; read at most this much to parse it.
NPY_HEADER_PREFIX = 12 + 10_000
_DIM = re.compile(r"\s*(\d{1,15})\s*")
_ONE_TENSOR_NOTE = " (raw and .npy bodies carry one tensor: use .npz, JSON or KServe v2 for several)"


class NpyCodec(Codec):
    format = FORMAT_NPY
    one_tensor = True

    def matches(self, request: BodyRequest) -> bool:
        # Raw bytes that happen to start with the magic, described by raw headers, stay raw.
        return request.is_bytes and request.body.startswith(NPY_MAGIC) and not described_raw(request)

    def decode(self, request: BodyRequest) -> DecodedRequest:
        return _decode_npy(request)

    def encode(
        self, arrays: dict[str, np.ndarray], request: DecodedRequest, meta: ResponseMeta
    ) -> EncodedResponse:
        array, tensor_headers = _one_tensor(arrays)
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array, allow_pickle=False)
        return EncodedResponse(buffer.getvalue(), NPY_CONTENT_TYPE, tensor_headers)


class RawCodec(Codec):
    format = FORMAT_RAW
    one_tensor = True

    def matches(self, request: BodyRequest) -> bool:
        return request.is_bytes and request.media == RAW_CONTENT_TYPE

    def decode(self, request: BodyRequest) -> DecodedRequest:
        return _decode_raw(request)

    def encode(
        self, arrays: dict[str, np.ndarray], request: DecodedRequest, meta: ResponseMeta
    ) -> EncodedResponse:
        array, tensor_headers = _one_tensor(arrays)
        return EncodedResponse(array.tobytes(), RAW_CONTENT_TYPE, tensor_headers)


def _one_tensor(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, str]]:
    ((name, array),) = arrays.items()
    array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
    tensor_headers = {
        "X-Tensor-Name": name,
        "X-Tensor-Shape": ",".join(map(str, array.shape)),
        "X-Tensor-Dtype": array.dtype.name,
    }
    return array, tensor_headers


@stamp(FORMAT_RAW)
def _decode_raw(request: BodyRequest) -> DecodedRequest:
    body, headers, inputs, limits = request.body, request.headers, request.inputs, request.limits
    spec = _target_input(request)
    requested = _single_output(request)
    dtype_text = header(headers, DTYPE_HEADER)
    dtype_name = spec.dtype if dtype_text is None else _parse_dtype(dtype_text)
    source = np.dtype(dtype_name).newbyteorder("<")
    check_cast(spec.name, np.dtype(dtype_name), np.dtype(spec.dtype))
    shape_text = header(headers, SHAPE_HEADER)
    if shape_text is None:
        shape = _infer_raw_shape(len(body), spec, source.itemsize)
    else:
        shape = _parse_shape(shape_text)
    _check_claim(request, spec, shape, source, len(body), SHAPE_HEADER)
    array = np.frombuffer(body, dtype=source).reshape(shape)
    arrays, batch, had_batch_dim = validate_inputs(
        {spec.name: array}, inputs, limits, _ONE_TENSOR_NOTE
    )
    return DecodedRequest(arrays, batch, FORMAT_RAW, had_batch_dim, None, requested)


@stamp(FORMAT_NPY)
def _decode_npy(request: BodyRequest) -> DecodedRequest:
    body = request.body
    spec = _target_input(request)
    requested = _single_output(request)
    shape, fortran_order, dtype, offset = _read_npy_header(body)
    check_cast(spec.name, dtype, np.dtype(spec.dtype))
    _check_claim(request, spec, shape, dtype, len(body) - offset, ".npy shape")
    count = math.prod(shape)
    if fortran_order:
        array = np.frombuffer(body, dtype, count, offset).reshape(shape[::-1]).T
    else:
        array = np.frombuffer(body, dtype, count, offset).reshape(shape)
    arrays, batch, had_batch_dim = validate_inputs(
        {spec.name: array}, request.inputs, request.limits, _ONE_TENSOR_NOTE
    )
    return DecodedRequest(arrays, batch, FORMAT_NPY, had_batch_dim, None, requested)


def _single_output(request: BodyRequest) -> tuple[str, ...] | None:
    """The one output a raw/.npy response will carry (None: decide when encoding)."""
    outputs = request.outputs
    name = header(request.headers, OUTPUT_HEADER)
    if name is not None:
        check_output_name(name, outputs)
        return (name,)
    if outputs is not None and len(outputs) > 1:
        raise RequestError(
            BAD_REQUEST,
            f"the {OUTPUT_HEADER} header is required for a raw or .npy request: the model's "
            f"outputs are {name_list(s.name for s in outputs)}",
        )
    return None


def _target_input(request: BodyRequest) -> TensorSpec:
    inputs = request.inputs
    name = header(request.headers, NAME_HEADER)
    if name is None:
        if len(inputs) > 1:
            raise RequestError(
                BAD_REQUEST,
                f"the {NAME_HEADER} header is required: the model's inputs are "
                f"{name_list(s.name for s in inputs)}",
            )
        return inputs[0]
    for spec in inputs:
        if spec.name == name:
            return spec
    raise RequestError(
        BAD_REQUEST,
        f"unknown input {quoted(name)} in {NAME_HEADER}; the model's inputs are "
        f"{name_list(s.name for s in inputs)}",
    )


def _parse_dtype(text: str) -> str:
    name = DTYPE_ALIASES.get(text.strip().lower())
    if name is None:
        raise RequestError(
            BAD_REQUEST,
            f"unsupported {DTYPE_HEADER} {quoted(text)}; use one of {', '.join(NUMPY_TO_V2)}",
        )
    return name


def _parse_shape(text: str) -> tuple[int, ...]:
    inner = text.strip() if len(text) <= MAX_HEADER_CHARS else "?"
    if inner[:1] in "[(" and inner[-1:] in "])" and inner:
        inner = inner[1:-1]
    parts = [] if not inner.strip() else inner.split(",")
    matches = [_DIM.fullmatch(part) for part in parts]
    if len(parts) > MAX_RANK or not all(matches):
        raise RequestError(
            BAD_REQUEST,
            f"{SHAPE_HEADER} {quoted(text)} is not a comma-separated list of dimensions",
        )
    return tuple(int(m.group(1)) for m in matches if m)


def _infer_raw_shape(nbytes: int, spec: TensorSpec, itemsize: int) -> tuple[int, ...]:
    dims = spec.sample_shape
    if any(d is None for d in dims):
        raise RequestError(
            BAD_REQUEST,
            f"the {SHAPE_HEADER} header is required: input {spec.name!r} has dynamic dims "
            f"{format_shape(dims)}",
        )
    sample = tuple(d for d in dims if d is not None)  # all of them, checked above
    sample_bytes = math.prod(sample) * itemsize
    if sample_bytes == 0 or nbytes % sample_bytes:
        raise RequestError(
            BAD_REQUEST,
            f"body of {nbytes} bytes is not a whole number of {format_shape(sample)} samples "
            f"({sample_bytes} bytes each); send {SHAPE_HEADER}",
        )
    return (nbytes // sample_bytes, *sample)


def _check_claim(
    request: BodyRequest,
    spec: TensorSpec,
    shape: tuple[int, ...],
    dtype: np.dtype,
    nbytes: int,
    source: str,
) -> None:
    """Claimed tensor vs the bytes actually sent, the spec and the limits, before any array."""
    needed = math.prod(shape) * dtype.itemsize
    if needed != nbytes:
        raise RequestError(
            BAD_REQUEST,
            f"input {spec.name!r}: {source} {clip(format_shape(shape))} of {dtype.name} needs "
            f"{clip(str(needed))} bytes, the body has {nbytes}",
        )
    check_element_budget(spec.name, math.prod(shape), request.limits.max_elements)
    check_shape(spec, shape, request.limits)


def _read_npy_header(body: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) from the header alone; never unpickles."""
    stream = io.BytesIO(bytes(body[:NPY_HEADER_PREFIX]))
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise RequestError(
                BAD_REQUEST, f".npy format version {version} is not supported (use 1.0 or 2.0)"
            )
    except RequestError:
        raise
    except Exception:  # noqa: BLE001 - any parse failure is the client's malformed header
        # numpy mostly says ValueError, but its header parsing (ast, tokenize for old headers,
        # dtype construction) has no closed list of failures on hostile input; all mean the same.
        raise RequestError(BAD_REQUEST, "malformed .npy header") from None
    if (
        dtype.names is not None
        or dtype.subdtype is not None
        or dtype.hasobject
        or dtype.name not in NUMPY_TO_V2
    ):
        raise RequestError(
            BAD_REQUEST, f".npy dtype {quoted(str(dtype))} is not supported (numeric dtypes only)"
        )
    if len(shape) > MAX_RANK or any(d < 0 for d in shape):
        raise RequestError(BAD_REQUEST, f".npy shape {clip(format_shape(shape))} is not valid")
    return shape, fortran_order, dtype, stream.tell()
