"""Request bodies in, validated numpy arrays out; model outputs back into response bodies.

Body formats (``DecodedRequest.format``), told apart by the body first and the content type next:
  "npz"       a .npz file (zip magic or application/x-npz): one member per input, named by it
  "npy"       a .npy file (starts with the NumPy magic), whatever the content type
  "raw"       ``application/octet-stream``: little-endian tensor bytes, described by the headers
              X-Tensor-Shape ("1,3,224,224"), X-Tensor-Dtype (default: the spec's) and
              X-Tensor-Name (default: the only input)
  "kservev2"  Open Inference Protocol JSON: {"inputs": [{"name", "shape", "datatype", "data"}]},
              decoded and encoded by ``handlers.protocol.kserve_v2``; with an
              Inference-Header-Content-Length header, the binary tensor extension (JSON header
              + blobs, ``handlers.protocol.v2_binary``), answered in binary when asked
  "json"      {"input name": nested lists}, or a bare nested list for a single-input model
Responses mirror the request's format. Raw and .npy bodies carry one tensor each way; the
response tensor is the only output or the one named by X-Output-Name.

Each format is one ``Codec`` object (``matches`` / ``decode`` / ``encode`` / ``error``) over the
shared checks in ``handlers.protocol.validation``. ``CODECS`` lists them in the order they are
tried: a request's codec is chosen once, from its bytes (or, for the JSON family, from the
parsed document), and that codec alone decodes the request and answers it.

Only RequestError leaves ``decode_request`` for anything the client sent, and nothing sized by a
client's claim is allocated before the claim is checked against the body and the limits.
Standard library + numpy only: this module runs inside TorchServe workers.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import numpy as np

from handlers.protocol.json_tensors import json_list, nested_to_array
from handlers.protocol.kserve_v2 import (
    FORMAT_V2,
    MAX_RANK,
    NUMPY_TO_V2,
    V2_BINARY_HEADER,
    V2_TO_NUMPY,
    check_entries,
    check_output_name,
    decode_v2,
    is_v2_document,
    v2_error,
    v2_response,
)
from handlers.protocol.npz_codec import (
    FORMAT_NPZ,
    NPZ_CONTENT_TYPE,
    ZIP_MAGIC,
    decode_npz,
    encode_npz,
)
from handlers.protocol.v2_binary import (
    BINARY_CONTENT_TYPE,
    NO_BINARY,
    BinaryOutputs,
    binary_response,
    header_length,
    split_blobs,
)
from handlers.protocol.validation import (
    BAD_REQUEST,
    PAYLOAD_TOO_LARGE,
    UNSUPPORTED_MEDIA_TYPE,
    RequestError,
    RequestLimits,
    check_cast,
    check_element_budget,
    check_names,
    check_shape,
    clip,
    format_shape,
    name_list,
    quoted,
    validate_inputs,
)

if TYPE_CHECKING:
    from handlers.artifact.manifest import TensorSpec

__all__ = [
    "FORMAT_V2",
    "NUMPY_TO_V2",
    "V2_TO_NUMPY",
    "DecodedRequest",
    "EncodedResponse",
    "RequestError",
    "RequestLimits",
    "decode_request",
    "encode_error",
    "encode_response",
    "nested_to_array",
]

FORMAT_JSON = "json"
FORMAT_RAW = "raw"
FORMAT_NPY = "npy"

JSON_CONTENT_TYPE = "application/json"
RAW_CONTENT_TYPE = "application/octet-stream"
NPY_CONTENT_TYPE = "application/x-npy"
NPY_CONTENT_TYPES = frozenset({NPY_CONTENT_TYPE, "application/npy"})
NPY_MAGIC = b"\x93NUMPY"

SHAPE_HEADER = "X-Tensor-Shape"
DTYPE_HEADER = "X-Tensor-Dtype"
NAME_HEADER = "X-Tensor-Name"
OUTPUT_HEADER = "X-Output-Name"

# X-Tensor-Dtype accepts numpy names and v2 names, case-insensitively.
DTYPE_ALIASES = {**{n: n for n in NUMPY_TO_V2}, **{v2.lower(): n for v2, n in V2_TO_NUMPY.items()}}

MAX_HEADER_CHARS = 512
# A .npy header never exceeds numpy's own 10000-char cap; read at most this much to parse it.
NPY_HEADER_PREFIX = 12 + 10_000
# Commas bound the number of JSON values before json.loads builds them; keys and v2 metadata
# add a few commas of their own.
JSON_COMMA_SLACK = 4096

_DIM = re.compile(r"\s*(\d{1,15})\s*")
_JSON_START = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\n]*[\[{]")


@dataclass(frozen=True)
class DecodedRequest:
    """One request's tensors, each with a leading batch dim and exactly its spec's dtype.

    Arrays may be read-only views of the request body (raw and .npy decode without copying).
    """

    arrays: dict[str, np.ndarray]
    batch: int
    format: str
    had_batch_dim: bool
    request_id: str | None = None  # KServe v2 "id"
    output_names: tuple[str, ...] | None = None  # v2 "outputs" or X-Output-Name; None: default
    binary_outputs: BinaryOutputs = NO_BINARY  # v2: outputs to answer as binary blobs


@dataclass(frozen=True)
class EncodedResponse:
    body: bytes | str | dict[str, Any] | list[Any]
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200


# ---------------------------------------------------------------------------------------------
# decoding


def decode_request(
    body: bytes | bytearray | memoryview | str | dict[str, Any] | list[Any] | None,
    content_type: str | None,
    headers: Mapping[str, Any] | None,
    inputs: Sequence[TensorSpec],
    limits: RequestLimits,
    *,
    outputs: Sequence[TensorSpec] | None = None,
) -> DecodedRequest:
    """Decode and validate one request; raises only ``RequestError`` for client mistakes.

    ``body`` is what TorchServe hands the handler: bytes, or an object/str it already decoded.
    ``content_type`` wins over a Content-Type in ``headers``; header names match in any case.
    ``outputs``, when given, lets requested output names be checked before inference.
    A request that came in on TorchServe's KServe routes has its errors in KServe's form.
    """
    try:
        return _decode_body(body, content_type, headers, tuple(inputs), limits, outputs)
    except RequestError as err:
        if on_kserve_route(headers):
            err.request_format = FORMAT_V2
        raise


def on_kserve_route(headers: Mapping[str, Any] | None) -> bool:
    """Whether TorchServe received the request on /v2/models/{name}/infer (or KServe v1's route).

    TorchServe 0.12's frontend adds an ``explain`` header to every inference request it passes
    on, and a ``url_path`` header only to those that came in on /predictions. KServe's clients
    and its TorchServe wrapper read errors as ``{"error": message}`` whatever the body was.
    """
    return header(headers, "explain") is not None and header(headers, "url_path") is None


def _decode_body(
    body: Any,
    content_type: str | None,
    headers: Mapping[str, Any] | None,
    inputs: tuple[TensorSpec, ...],
    limits: RequestLimits,
    outputs: Sequence[TensorSpec] | None,
) -> DecodedRequest:
    if not inputs:
        raise ValueError("the model declares no inputs")
    media = _media_type(content_type) or _media_type(header(headers, "content-type"))
    if isinstance(body, memoryview):
        body = body.tobytes()
    if isinstance(body, str):
        body = _utf8(body)
    if body is None or (isinstance(body, (bytes, bytearray)) and not body):
        raise RequestError(BAD_REQUEST, _empty_body_message(media))
    _refuse_content_encoding(body, media, headers)
    if not isinstance(body, (bytes, bytearray)):
        return _decode_document(body, inputs, limits, outputs)  # decoded by TorchServe already
    if len(body) > limits.max_body_bytes:
        raise RequestError(
            PAYLOAD_TOO_LARGE,
            f"request body of {len(body)} bytes exceeds the limit of {limits.max_body_bytes}",
        )
    codec = next((c for c in CODECS if c.matches(body, media, headers)), None)
    if codec is not None:
        return codec.decode(body, headers, inputs, limits, outputs)
    if media in NPY_CONTENT_TYPES:
        raise RequestError(BAD_REQUEST, "body is not a .npy file (no NumPy magic at its start)")
    if _is_json_media(media) or _JSON_START.match(body):
        return _decode_document(_parse_json(body, limits), inputs, limits, outputs)
    shown = "none given" if media is None else quoted(media)
    raise RequestError(
        UNSUPPORTED_MEDIA_TYPE,
        f"unsupported content type ({shown}) for a non-JSON body; send application/json, "
        f"{RAW_CONTENT_TYPE} (raw tensor), {NPY_CONTENT_TYPE} or {NPZ_CONTENT_TYPE}",
    )


def _empty_body_message(media: str | None) -> str:
    if media is not None and media.startswith("multipart/"):
        # TorchServe hands over no part when the body does not match the declared boundary.
        return ("multipart body with no readable part: check that the boundary in Content-Type "
                "matches the body's, or send the tensor as the whole body")
    return "empty request body"


# Compressed bodies would otherwise fail as malformed JSON or tensor bytes (a misleading 400).
_GZIP_MAGIC = b"\x1f\x8b"


def _refuse_content_encoding(body: Any, media: str | None, headers: Mapping[str, Any] | None) -> None:
    encoding = (header(headers, "content-encoding") or "").strip().lower()
    if encoding not in ("", "identity"):
        raise RequestError(
            UNSUPPORTED_MEDIA_TYPE,
            f"Content-Encoding {quoted(encoding)} is not supported; send the body uncompressed",
        )
    # Raw tensor bytes may start with these two bytes: only a body that claims no raw media.
    if media != RAW_CONTENT_TYPE and isinstance(body, (bytes, bytearray)) and body.startswith(_GZIP_MAGIC):
        raise RequestError(
            UNSUPPORTED_MEDIA_TYPE,
            "the body is gzip-compressed; content encodings are not supported, send it uncompressed",
        )


def header(headers: Mapping[str, Any] | None, name: str) -> str | None:
    """A request header by case-insensitive name; values that are not text are ignored.

    TorchServe's header dict keeps the client's spelling of names and also holds one entry per
    body part (``{"body": {"content-type": ...}}``), hence the type checks.
    """
    if not headers:
        return None
    value = headers.get(name)
    if value is None:
        wanted = name.lower()
        for key, candidate in headers.items():
            if isinstance(key, (str, bytes)) and _text(key).lower() == wanted:
                value = candidate
                break
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("latin-1")
    return value if isinstance(value, str) else None


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _stamp(request_format: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Tag RequestErrors raised while decoding ``request_format`` so errors answer in kind."""

    def wrap(decoder: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(decoder)
        def decode(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return decoder(*args, **kwargs)
            except RequestError as err:
                err.request_format = err.request_format or request_format
                raise

        return decode

    return wrap


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _media_type(content_type: Any) -> str | None:
    if isinstance(content_type, (bytes, bytearray)):
        content_type = content_type.decode("latin-1")
    if not isinstance(content_type, str):
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


def _is_json_media(media: str | None) -> bool:
    return media is not None and (
        media in (JSON_CONTENT_TYPE, "text/json") or media.endswith("+json")
    )


def _utf8(text: str) -> bytes:
    # TorchServe decodes text/* bodies to str; encoding back restores the client's bytes.
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(BAD_REQUEST, "request body is not valid UTF-8 text") from None


def _parse_json(body: bytes | bytearray, limits: RequestLimits) -> Any:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RequestError(
            BAD_REQUEST, f"JSON body is not valid UTF-8 (byte {exc.start})"
        ) from None
    depth = json_nesting_depth(body)
    if depth > limits.max_json_depth:
        raise RequestError(
            BAD_REQUEST,
            f"JSON nesting depth {depth} exceeds the limit of {limits.max_json_depth}",
        )
    if body.count(b",") > limits.max_elements + JSON_COMMA_SLACK:
        raise RequestError(
            PAYLOAD_TOO_LARGE,
            f"JSON body holds more values than the limit of {limits.max_elements} elements",
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(
            BAD_REQUEST,
            f"invalid JSON: {clip(exc.msg)} at line {exc.lineno} column {exc.colno}",
        ) from None
    except (ValueError, RecursionError):
        # e.g. an integer literal past Python's 4300-digit conversion limit
        raise RequestError(BAD_REQUEST, "invalid JSON: a value cannot be parsed") from None


_NOT_JSON_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_DEPTH_CHUNK = 1 << 20


def json_nesting_depth(data: bytes | bytearray) -> int:
    """Deepest [ / { nesting outside string literals, without recursing (UTF-8 JSON text).

    On the prefix json.loads actually parses this equals the parser's recursion depth, so
    checking it first makes deep input a 400, never a RecursionError.
    """
    if b"\\" in data:
        # Drop escaped backslashes, then escaped quotes: what is left of a quote delimits strings.
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Multi-byte UTF-8 never contains ASCII bytes, so filtering bytes keeps the structure.
    marks = np.frombuffer(data.translate(None, _NOT_JSON_STRUCTURE), dtype=np.uint8)
    deepest = depth = quotes_so_far = 0
    # Chunks keep the temporaries small even for a body made only of brackets.
    for start in range(0, marks.size, _DEPTH_CHUNK):
        chunk = marks[start : start + _DEPTH_CHUNK]
        steps = ((chunk == 0x5B) | (chunk == 0x7B)).astype(np.int32)
        steps -= (chunk == 0x5D) | (chunk == 0x7D)
        quotes = np.cumsum(chunk == 0x22, dtype=np.int32) + quotes_so_far
        steps[quotes % 2 == 1] = 0  # brackets inside strings
        levels = np.cumsum(steps, dtype=np.int64) + depth
        deepest = max(deepest, int(levels.max()))
        depth, quotes_so_far = int(levels[-1]), int(quotes[-1])
    return deepest


def _decode_document(
    value: Any,
    inputs: tuple[TensorSpec, ...],
    limits: RequestLimits,
    outputs: Sequence[TensorSpec] | None,
) -> DecodedRequest:
    """A parsed JSON document: the JSON-family codec whose shape it has decodes it."""
    if isinstance(value, dict) and "inputs" in value and not is_v2_document(value) and not any(
        spec.name == "inputs" for spec in inputs
    ):
        # A v2 request gone wrong, not a plain one: answer in v2's form, naming the field.
        raise RequestError(
            BAD_REQUEST,
            'KServe v2 request: "inputs" must be a list of tensor objects '
            f'({{"name", "shape", "datatype", "data"}}), got {type(value["inputs"]).__name__}',
            FORMAT_V2,
        )
    codec = next(c for c in CODECS if c.matches(value, JSON_CONTENT_TYPE, None))
    return codec.decode(value, None, inputs, limits, outputs)


@_stamp(FORMAT_JSON)
def _decode_plain_json(
    value: Any, inputs: tuple[TensorSpec, ...], limits: RequestLimits
) -> DecodedRequest:
    if isinstance(value, dict):
        check_names(value.keys(), inputs)
        given = value
    elif len(inputs) == 1:
        given = {inputs[0].name: value}
    else:
        raise RequestError(
            BAD_REQUEST,
            "a bare JSON array or value is accepted only for single-input models; send an object "
            f"mapping each input ({name_list(s.name for s in inputs)}) to its array",
        )
    budget = limits.max_elements
    candidates = {}
    for spec in inputs:
        dtype = np.dtype(spec.dtype)
        array = nested_to_array(given[spec.name], spec.name, dtype, len(spec.shape), budget)
        budget -= array.size
        candidates[spec.name] = array
    arrays, batch, had_batch_dim = validate_inputs(candidates, inputs, limits)
    return DecodedRequest(arrays, batch, FORMAT_JSON, had_batch_dim)


def _single_output(
    headers: Mapping[str, Any] | None, outputs: Sequence[TensorSpec] | None
) -> tuple[str, ...] | None:
    """The one output a raw/.npy response will carry (None: decide when encoding)."""
    name = header(headers, OUTPUT_HEADER)
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


_ONE_TENSOR_NOTE = " (raw and .npy bodies carry one tensor: use .npz, JSON or KServe v2 for several)"


def _npz_outputs(
    headers: Mapping[str, Any] | None, outputs: Sequence[TensorSpec] | None
) -> tuple[str, ...] | None:
    name = header(headers, OUTPUT_HEADER)
    if name is None:
        return None
    check_output_name(name, outputs)
    return (name,)


def _target_input(headers: Mapping[str, Any] | None, inputs: tuple[TensorSpec, ...]) -> TensorSpec:
    name = header(headers, NAME_HEADER)
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


@_stamp(FORMAT_RAW)
def _decode_raw(
    body: bytes,
    headers: Mapping[str, Any] | None,
    inputs: tuple[TensorSpec, ...],
    limits: RequestLimits,
    outputs: Sequence[TensorSpec] | None,
) -> DecodedRequest:
    spec = _target_input(headers, inputs)
    requested = _single_output(headers, outputs)
    dtype_text = header(headers, DTYPE_HEADER)
    dtype_name = spec.dtype if dtype_text is None else _parse_dtype(dtype_text)
    source = np.dtype(dtype_name).newbyteorder("<")
    check_cast(spec.name, np.dtype(dtype_name), np.dtype(spec.dtype))
    shape_text = header(headers, SHAPE_HEADER)
    if shape_text is None:
        shape = _infer_raw_shape(len(body), spec, source.itemsize)
    else:
        shape = _parse_shape(shape_text)
    _check_claim(spec, shape, source, len(body), limits, SHAPE_HEADER)
    array = np.frombuffer(body, dtype=source).reshape(shape)
    arrays, batch, had_batch_dim = validate_inputs(
        {spec.name: array}, inputs, limits, _ONE_TENSOR_NOTE
    )
    return DecodedRequest(arrays, batch, FORMAT_RAW, had_batch_dim, None, requested)


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
    spec: TensorSpec,
    shape: tuple[int, ...],
    dtype: np.dtype,
    nbytes: int,
    limits: RequestLimits,
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
    check_element_budget(spec.name, math.prod(shape), limits.max_elements)
    check_shape(spec, shape, limits)


@_stamp(FORMAT_NPY)
def _decode_npy(
    body: bytes,
    headers: Mapping[str, Any] | None,
    inputs: tuple[TensorSpec, ...],
    limits: RequestLimits,
    outputs: Sequence[TensorSpec] | None,
) -> DecodedRequest:
    spec = _target_input(headers, inputs)
    requested = _single_output(headers, outputs)
    shape, fortran_order, dtype, offset = _read_npy_header(body)
    check_cast(spec.name, dtype, np.dtype(spec.dtype))
    _check_claim(spec, shape, dtype, len(body) - offset, limits, ".npy shape")
    count = math.prod(shape)
    if fortran_order:
        array = np.frombuffer(body, dtype, count, offset).reshape(shape[::-1]).T
    else:
        array = np.frombuffer(body, dtype, count, offset).reshape(shape)
    arrays, batch, had_batch_dim = validate_inputs(
        {spec.name: array}, inputs, limits, _ONE_TENSOR_NOTE
    )
    return DecodedRequest(arrays, batch, FORMAT_NPY, had_batch_dim, None, requested)


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


# ---------------------------------------------------------------------------------------------
# encoding

_ERROR_TYPES = {
    BAD_REQUEST: "BadRequest",
    PAYLOAD_TOO_LARGE: "PayloadTooLarge",
    UNSUPPORTED_MEDIA_TYPE: "UnsupportedMediaType",
}


def encode_response(
    outputs: Mapping[str, np.ndarray],
    request: DecodedRequest,
    output_specs: Sequence[TensorSpec] | None = None,
    *,
    model_name: str = "",
    model_version: str | None = None,
    request_id: str | None = None,
) -> EncodedResponse:
    """This request's slice of the outputs (leading dim == ``request.batch``) in its format.

    ``request_id`` is the v2 response id when the request carried none (e.g. TorchServe's).
    Raises ``RequestError`` (400) for an unknown requested output, ``ValueError`` for outputs
    that do not match the request (a server bug, not the client's).
    """
    codec = _BY_FORMAT.get(request.format)
    if codec is None:
        raise ValueError(f"unknown request format {request.format!r}")
    names = _response_names(outputs, request, output_specs, codec)
    arrays = {name: _unbatched(name, outputs[name], request) for name in names}
    if request.request_id is not None:
        request_id = request.request_id
    return codec.encode(arrays, request, model_name, model_version, request_id)


def encode_error(err: RequestError, request_format: str | None = None) -> EncodedResponse:
    """A client error as JSON; KServe v2 requests get the protocol's ``{"error": message}``."""
    codec = _BY_FORMAT.get(request_format or err.request_format or "", JSON_CODEC)
    return codec.error(err)


def _response_names(
    outputs: Mapping[str, np.ndarray],
    request: DecodedRequest,
    output_specs: Sequence[TensorSpec] | None,
    codec: Codec,
) -> list[str]:
    if output_specs:
        available = [spec.name for spec in output_specs]
        missing = [name for name in available if name not in outputs]
        if missing:
            raise ValueError(f"model outputs {missing} are missing from the results")
    else:
        available = list(outputs)
    if request.output_names:
        for name in request.output_names:
            if name not in available:
                raise RequestError(
                    BAD_REQUEST,
                    f"unknown output {quoted(name)}; the model's outputs are {name_list(available)}",
                    request.format,
                )
        names = list(request.output_names)
    else:
        names = available
    if codec.one_tensor and len(names) != 1:
        raise RequestError(
            BAD_REQUEST,
            f"the {OUTPUT_HEADER} header is required: the model's outputs are {name_list(names)}",
            request.format,
        )
    return names


def _unbatched(name: str, array: np.ndarray, request: DecodedRequest) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 0 or array.shape[0] != request.batch:
        raise ValueError(
            f"output {name!r} has shape {array.shape}, expected a leading batch of {request.batch}"
        )
    if array.dtype.name not in NUMPY_TO_V2:
        raise ValueError(f"output {name!r} has unsupported dtype {array.dtype}")
    return array if request.had_batch_dim else array[0]


def _dumps(document: Any) -> str:
    return json.dumps(document, separators=(",", ":"), allow_nan=False)


# ---------------------------------------------------------------------------------------------
# one codec per body format


class Codec:
    """One body format: which requests are its own, how to decode them, how to answer them.

    ``matches`` sees the body as it arrived (bytes) or, for the JSON family, the parsed
    document; a request is decoded and answered by the one codec chosen for it.
    """

    format = ""
    one_tensor = False  # raw and .npy bodies carry a single tensor each way

    def matches(self, body: Any, media: str | None, headers: Mapping[str, Any] | None) -> bool:
        raise NotImplementedError

    def decode(
        self,
        body: Any,
        headers: Mapping[str, Any] | None,
        inputs: tuple[TensorSpec, ...],
        limits: RequestLimits,
        outputs: Sequence[TensorSpec] | None,
    ) -> DecodedRequest:
        raise NotImplementedError

    def encode(
        self,
        arrays: dict[str, np.ndarray],
        request: DecodedRequest,
        model_name: str,
        model_version: str | None,
        request_id: str | None,
    ) -> EncodedResponse:
        raise NotImplementedError

    def error(self, err: RequestError) -> EncodedResponse:
        """A client error as JSON (every format but KServe v2 answers errors this way)."""
        body = {
            "code": err.status,
            "type": _ERROR_TYPES.get(err.status, "RequestError"),
            "message": err.message,
        }
        return EncodedResponse(_dumps(body), JSON_CONTENT_TYPE, {}, err.status)


def _one_tensor(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, str]]:
    ((name, array),) = arrays.items()
    array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
    tensor_headers = {
        "X-Tensor-Name": name,
        "X-Tensor-Shape": ",".join(map(str, array.shape)),
        "X-Tensor-Dtype": array.dtype.name,
    }
    return array, tensor_headers


class NpyCodec(Codec):
    format = FORMAT_NPY
    one_tensor = True

    def matches(self, body: Any, media: str | None, headers: Mapping[str, Any] | None) -> bool:
        if not isinstance(body, (bytes, bytearray)) or not body.startswith(NPY_MAGIC):
            return False
        # Raw bytes that happen to start with the magic, described by raw headers, stay raw.
        explicit_raw = media == RAW_CONTENT_TYPE and (
            header(headers, SHAPE_HEADER) is not None or header(headers, DTYPE_HEADER) is not None
        )
        return not explicit_raw

    def decode(
        self,
        body: Any,
        headers: Mapping[str, Any] | None,
        inputs: tuple[TensorSpec, ...],
        limits: RequestLimits,
        outputs: Sequence[TensorSpec] | None,
    ) -> DecodedRequest:
        return _decode_npy(body, headers, inputs, limits, outputs)

    def encode(
        self,
        arrays: dict[str, np.ndarray],
        request: DecodedRequest,
        model_name: str,
        model_version: str | None,
        request_id: str | None,
    ) -> EncodedResponse:
        array, tensor_headers = _one_tensor(arrays)
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array, allow_pickle=False)
        return EncodedResponse(buffer.getvalue(), NPY_CONTENT_TYPE, tensor_headers)


class NpzCodec(Codec):
    """Several named tensors in one binary body: NumPy's .npz (a zip of .npy, never pickled)."""

    format = FORMAT_NPZ

    def matches(self, body: Any, media: str | None, headers: Mapping[str, Any] | None) -> bool:
        if not isinstance(body, (bytes, bytearray)):
            return False
        explicit_raw = media == RAW_CONTENT_TYPE and (
            header(headers, SHAPE_HEADER) is not None or header(headers, DTYPE_HEADER) is not None
        )
        return (body.startswith(ZIP_MAGIC) and not explicit_raw) or media == NPZ_CONTENT_TYPE

    def decode(
        self,
        body: Any,
        headers: Mapping[str, Any] | None,
        inputs: tuple[TensorSpec, ...],
        limits: RequestLimits,
        outputs: Sequence[TensorSpec] | None,
    ) -> DecodedRequest:
        arrays, batch, had_batch_dim = decode_npz(bytes(body), inputs, limits)
        return DecodedRequest(
            arrays, batch, FORMAT_NPZ, had_batch_dim, None, _npz_outputs(headers, outputs)
        )

    def encode(
        self,
        arrays: dict[str, np.ndarray],
        request: DecodedRequest,
        model_name: str,
        model_version: str | None,
        request_id: str | None,
    ) -> EncodedResponse:
        return encode_npz(arrays, had_batch_dim=True)  # already this request's (unbatched) rows


class RawCodec(Codec):
    format = FORMAT_RAW
    one_tensor = True

    def matches(self, body: Any, media: str | None, headers: Mapping[str, Any] | None) -> bool:
        return isinstance(body, (bytes, bytearray)) and media == RAW_CONTENT_TYPE

    def decode(
        self,
        body: Any,
        headers: Mapping[str, Any] | None,
        inputs: tuple[TensorSpec, ...],
        limits: RequestLimits,
        outputs: Sequence[TensorSpec] | None,
    ) -> DecodedRequest:
        return _decode_raw(body, headers, inputs, limits, outputs)

    def encode(
        self,
        arrays: dict[str, np.ndarray],
        request: DecodedRequest,
        model_name: str,
        model_version: str | None,
        request_id: str | None,
    ) -> EncodedResponse:
        array, tensor_headers = _one_tensor(arrays)
        return EncodedResponse(array.tobytes(), RAW_CONTENT_TYPE, tensor_headers)


class KServeV2Codec(Codec):
    """Open Inference Protocol JSON, and its binary tensor extension (a body with an
    ``Inference-Header-Content-Length`` header); the protocol lives in ``protocol/kserve_v2.py``,
    the extension's byte layout in ``protocol/v2_binary.py``."""

    format = FORMAT_V2

    def matches(self, body: Any, media: str | None, headers: Mapping[str, Any] | None) -> bool:
        if isinstance(body, (bytes, bytearray)):
            return header(headers, V2_BINARY_HEADER) is not None
        return is_v2_document(body)

    def decode(
        self,
        body: Any,
        headers: Mapping[str, Any] | None,
        inputs: tuple[TensorSpec, ...],
        limits: RequestLimits,
        outputs: Sequence[TensorSpec] | None,
    ) -> DecodedRequest:
        blobs = None
        if isinstance(body, (bytes, bytearray)):
            body, blobs = split_v2_binary(body, headers, limits)
        v2 = decode_v2(body, inputs, limits, outputs, blobs)
        return DecodedRequest(
            v2.arrays, v2.batch, FORMAT_V2, v2.had_batch_dim, v2.request_id, v2.output_names,
            v2.binary_outputs,
        )

    def encode(
        self,
        arrays: dict[str, np.ndarray],
        request: DecodedRequest,
        model_name: str,
        model_version: str | None,
        request_id: str | None,
    ) -> EncodedResponse:
        binary = request.binary_outputs
        response = v2_response(
            arrays, model_name=model_name, model_version=model_version, request_id=request_id,
            binary=binary,
        )
        if not any(binary.wants(name) for name in arrays):
            return EncodedResponse(_dumps(response), JSON_CONTENT_TYPE)
        body, json_bytes = binary_response(response, arrays, binary)
        return EncodedResponse(body, BINARY_CONTENT_TYPE, {V2_BINARY_HEADER: str(json_bytes)})

    def error(self, err: RequestError) -> EncodedResponse:
        return EncodedResponse(_dumps(v2_error(err.message)), JSON_CONTENT_TYPE, {}, err.status)


class JsonCodec(Codec):
    """{"input name": nested lists}, or a bare nested list for a single-input model."""

    format = FORMAT_JSON

    def matches(self, body: Any, media: str | None, headers: Mapping[str, Any] | None) -> bool:
        return not isinstance(body, (bytes, bytearray))  # any other parsed JSON document

    def decode(
        self,
        body: Any,
        headers: Mapping[str, Any] | None,
        inputs: tuple[TensorSpec, ...],
        limits: RequestLimits,
        outputs: Sequence[TensorSpec] | None,
    ) -> DecodedRequest:
        return _decode_plain_json(body, inputs, limits)

    def encode(
        self,
        arrays: dict[str, np.ndarray],
        request: DecodedRequest,
        model_name: str,
        model_version: str | None,
        request_id: str | None,
    ) -> EncodedResponse:
        body = {"outputs": {name: json_list(a) for name, a in arrays.items()}}
        return EncodedResponse(_dumps(body), JSON_CONTENT_TYPE)


@_stamp(FORMAT_V2)
def split_v2_binary(
    body: bytes | bytearray, headers: Mapping[str, Any] | None, limits: RequestLimits
) -> tuple[dict[str, Any], dict[str, memoryview]]:
    """A binary-extension body -> (its v2 JSON header, each binary input's blob by name)."""
    length = header_length(header(headers, V2_BINARY_HEADER) or "", len(body))
    document = _parse_json(body[:length], limits)
    if not is_v2_document(document):
        raise RequestError(
            BAD_REQUEST,
            f"the {length}-byte JSON header ({V2_BINARY_HEADER}) is not a KServe v2 request: "
            '"inputs" must be a list of tensor objects',
        )
    check_entries(document["inputs"])
    return document, split_blobs(document["inputs"], memoryview(body)[length:])


JSON_CODEC = JsonCodec()
# In the order they are tried; the JSON family last, on the parsed document. The v2 binary
# extension goes first: its header is explicit, whatever the content type says.
CODECS: tuple[Codec, ...] = (KServeV2Codec(), NpzCodec(), NpyCodec(), RawCodec(), JSON_CODEC)
_BY_FORMAT = {codec.format: codec for codec in CODECS}
