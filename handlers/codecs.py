"""Request bodies in, validated numpy arrays out; model outputs back into response bodies.

Body formats (``DecodedRequest.format``), told apart by the body first and the content type next:
  "npy"       a .npy file (starts with the NumPy magic), whatever the content type
  "raw"       ``application/octet-stream``: little-endian tensor bytes, described by the headers
              X-Tensor-Shape ("1,3,224,224"), X-Tensor-Dtype (default: the spec's) and
              X-Tensor-Name (default: the only input)
  "kservev2"  Open Inference Protocol JSON: {"inputs": [{"name", "shape", "datatype", "data"}]}
  "json"      {"input name": nested lists}, or a bare nested list for a single-input model
Responses mirror the request's format. Raw and .npy bodies carry one tensor each way; the
response tensor is the only output or the one named by X-Output-Name.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .validation import (
    BAD_REQUEST,
    PAYLOAD_TOO_LARGE,
    UNSUPPORTED_MEDIA_TYPE,
    RequestError,
    RequestLimits,
    all_finite,
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
    from .manifest import TensorSpec

__all__ = [
    "DecodedRequest",
    "EncodedResponse",
    "RequestError",
    "RequestLimits",
    "decode_request",
    "encode_error",
    "encode_response",
]

FORMAT_JSON = "json"
FORMAT_RAW = "raw"
FORMAT_NPY = "npy"
FORMAT_V2 = "kservev2"

JSON_CONTENT_TYPE = "application/json"
RAW_CONTENT_TYPE = "application/octet-stream"
NPY_CONTENT_TYPE = "application/x-npy"
NPY_CONTENT_TYPES = frozenset({NPY_CONTENT_TYPE, "application/npy"})
NPY_MAGIC = b"\x93NUMPY"

SHAPE_HEADER = "X-Tensor-Shape"
DTYPE_HEADER = "X-Tensor-Dtype"
NAME_HEADER = "X-Tensor-Name"
OUTPUT_HEADER = "X-Output-Name"
# Triton's binary-tensor extension of v2: JSON header + raw blobs in one body.
V2_BINARY_HEADER = "Inference-Header-Content-Length"

V2_TO_NUMPY = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
NUMPY_TO_V2 = {numpy_name: v2 for v2, numpy_name in V2_TO_NUMPY.items()}
# X-Tensor-Dtype accepts numpy names and v2 names, case-insensitively.
DTYPE_ALIASES = {**{n: n for n in NUMPY_TO_V2}, **{v2.lower(): n for v2, n in V2_TO_NUMPY.items()}}

MAX_RANK = 32
MAX_V2_ID_CHARS = 256
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


@dataclass(frozen=True)
class EncodedResponse:
    body: bytes | str | dict | list
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200


# ---------------------------------------------------------------------------------------------
# decoding


def decode_request(
    body: bytes | bytearray | memoryview | str | dict | list | None,
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
    """
    inputs = tuple(inputs)
    if not inputs:
        raise ValueError("the model declares no inputs")
    media = _media_type(content_type) or _media_type(header(headers, "content-type"))
    if isinstance(body, memoryview):
        body = body.tobytes()
    if isinstance(body, str):
        body = _utf8(body)
    if body is None or (isinstance(body, (bytes, bytearray)) and not body):
        raise RequestError(BAD_REQUEST, "empty request body")
    if not isinstance(body, (bytes, bytearray)):
        return _decode_json_value(body, inputs, limits, outputs)  # decoded by TorchServe already
    if len(body) > limits.max_body_bytes:
        raise RequestError(
            PAYLOAD_TOO_LARGE,
            f"request body of {len(body)} bytes exceeds the limit of {limits.max_body_bytes}",
        )
    if header(headers, V2_BINARY_HEADER) is not None:
        raise RequestError(
            UNSUPPORTED_MEDIA_TYPE,
            "the KServe v2 binary tensor extension is not supported; send tensor data as JSON",
        )
    explicit_raw = media == RAW_CONTENT_TYPE and (
        header(headers, SHAPE_HEADER) is not None or header(headers, DTYPE_HEADER) is not None
    )
    if body.startswith(NPY_MAGIC) and not explicit_raw:
        return _decode_npy(body, headers, inputs, limits, outputs)
    if media == RAW_CONTENT_TYPE:
        return _decode_raw(body, headers, inputs, limits, outputs)
    if media in NPY_CONTENT_TYPES:
        raise RequestError(BAD_REQUEST, "body is not a .npy file (no NumPy magic at its start)")
    if _is_json_media(media) or _JSON_START.match(body):
        return _decode_json_value(_parse_json(body, limits), inputs, limits, outputs)
    shown = "none given" if media is None else quoted(media)
    raise RequestError(
        UNSUPPORTED_MEDIA_TYPE,
        f"unsupported content type ({shown}) for a non-JSON body; send application/json, "
        f"{RAW_CONTENT_TYPE} (raw tensor) or {NPY_CONTENT_TYPE}",
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


def _stamp(request_format: str):
    """Tag RequestErrors raised while decoding ``request_format`` so errors answer in kind."""

    def wrap(decoder):
        @functools.wraps(decoder)
        def decode(*args, **kwargs):
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


def _decode_json_value(
    value: Any, inputs: tuple[TensorSpec, ...], limits: RequestLimits, outputs
) -> DecodedRequest:
    if isinstance(value, dict) and _is_v2(value):
        return _decode_v2(value, inputs, limits, outputs)
    return _decode_plain_json(value, inputs, limits)


def _is_v2(document: dict) -> bool:
    entries = document.get("inputs")
    return isinstance(entries, list) and (not entries or isinstance(entries[0], dict))


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
    shape = []
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


@_stamp(FORMAT_V2)
def _decode_v2(
    document: dict, inputs: tuple[TensorSpec, ...], limits: RequestLimits, outputs
) -> DecodedRequest:
    request_id = document.get("id")
    if request_id is not None and (
        not isinstance(request_id, str) or len(request_id) > MAX_V2_ID_CHARS
    ):
        raise RequestError(BAD_REQUEST, f"'id' must be a string of at most {MAX_V2_ID_CHARS} chars")
    if not isinstance(document.get("parameters", {}), dict):
        raise RequestError(BAD_REQUEST, "'parameters' must be an object")
    entries = document["inputs"]
    if not entries:
        raise RequestError(BAD_REQUEST, "'inputs' is empty")
    names = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise RequestError(
                BAD_REQUEST, f"inputs[{index}] must be an object with a string 'name'"
            )
        if entry["name"] in names:
            raise RequestError(BAD_REQUEST, f"input {quoted(entry['name'])} is given twice")
        names.append(entry["name"])
    check_names(names, inputs)
    specs = {spec.name: spec for spec in inputs}
    budget = limits.max_elements
    candidates = {}
    for entry in entries:
        array = _v2_tensor(entry, specs[entry["name"]], budget, limits)
        budget -= array.size
        candidates[entry["name"]] = array
    arrays, batch, had_batch_dim = validate_inputs(candidates, inputs, limits)
    requested = _v2_requested_outputs(document.get("outputs"), outputs)
    return DecodedRequest(arrays, batch, FORMAT_V2, had_batch_dim, request_id, requested)


def _v2_tensor(entry: dict, spec: TensorSpec, budget: int, limits: RequestLimits) -> np.ndarray:
    name = spec.name
    datatype = entry.get("datatype")
    expected = NUMPY_TO_V2[spec.dtype]
    if datatype == "BYTES":
        raise RequestError(
            BAD_REQUEST, f"input {name!r}: BYTES tensors are not supported; send {expected}"
        )
    if not isinstance(datatype, str) or datatype not in V2_TO_NUMPY:
        raise RequestError(
            BAD_REQUEST,
            f"input {name!r}: unknown datatype {quoted(datatype)}; this input expects {expected}",
        )
    source = np.dtype(V2_TO_NUMPY[datatype])
    check_cast(name, source, np.dtype(spec.dtype))
    parameters = entry.get("parameters")
    if isinstance(parameters, dict) and "binary_data_size" in parameters:
        raise RequestError(
            UNSUPPORTED_MEDIA_TYPE,
            f"input {name!r}: the binary tensor extension is not supported; send 'data' as JSON",
        )
    shape = entry.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise RequestError(
            BAD_REQUEST, f"input {name!r}: 'shape' must be a list of non-negative integers"
        )
    count = math.prod(shape)
    check_element_budget(name, count, budget)
    if "data" not in entry:
        raise RequestError(BAD_REQUEST, f"input {name!r}: 'data' is missing")
    data = entry["data"]
    flat_or_nested = data if isinstance(data, list) else [data]
    array = nested_to_array(flat_or_nested, name, source, max(len(shape), 1), budget)
    if array.size != count:
        raise RequestError(
            BAD_REQUEST,
            f"input {name!r}: shape {clip(format_shape(shape))} needs {count} values, "
            f"'data' has {array.size}",
        )
    check_shape(spec, shape, limits)
    return array.reshape(shape)


def _v2_requested_outputs(
    value: Any, outputs: Sequence[TensorSpec] | None
) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in value
    ):
        raise RequestError(BAD_REQUEST, "'outputs' must be a list of objects with a string 'name'")
    names = tuple(dict.fromkeys(o["name"] for o in value))
    for name in names:
        _check_output_name(name, outputs)
    return names or None


def _check_output_name(name: str, outputs: Sequence[TensorSpec] | None) -> None:
    known = [spec.name for spec in outputs or ()]
    if outputs is not None and name not in known:
        raise RequestError(
            BAD_REQUEST,
            f"unknown output {quoted(name)}; the model's outputs are {name_list(known)}",
        )


def _single_output(headers, outputs: Sequence[TensorSpec] | None) -> tuple[str, ...] | None:
    """The one output a raw/.npy response will carry (None: decide when encoding)."""
    name = header(headers, OUTPUT_HEADER)
    if name is not None:
        _check_output_name(name, outputs)
        return (name,)
    if outputs is not None and len(outputs) > 1:
        raise RequestError(
            BAD_REQUEST,
            f"the {OUTPUT_HEADER} header is required for a raw or .npy request: the model's "
            f"outputs are {name_list(s.name for s in outputs)}",
        )
    return None


_ONE_TENSOR_NOTE = " (raw and .npy bodies carry one tensor: use JSON or KServe v2 for several)"


def _target_input(headers, inputs: tuple[TensorSpec, ...]) -> TensorSpec:
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
def _decode_raw(body, headers, inputs, limits: RequestLimits, outputs) -> DecodedRequest:
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
    sample = spec.sample_shape
    if any(d is None for d in sample):
        raise RequestError(
            BAD_REQUEST,
            f"the {SHAPE_HEADER} header is required: input {spec.name!r} has dynamic dims "
            f"{format_shape(sample)}",
        )
    sample_bytes = math.prod(sample) * itemsize
    if sample_bytes == 0 or nbytes % sample_bytes:
        raise RequestError(
            BAD_REQUEST,
            f"body of {nbytes} bytes is not a whole number of {format_shape(sample)} samples "
            f"({sample_bytes} bytes each); send {SHAPE_HEADER}",
        )
    return (nbytes // sample_bytes, *sample)


def _check_claim(
    spec: TensorSpec, shape, dtype: np.dtype, nbytes: int, limits: RequestLimits, source: str
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
def _decode_npy(body, headers, inputs, limits: RequestLimits, outputs) -> DecodedRequest:
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


def _read_npy_header(body) -> tuple[tuple[int, ...], bool, np.dtype, int]:
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
    except Exception:
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
    names = _response_names(outputs, request, output_specs)
    arrays = {name: _unbatched(name, outputs[name], request) for name in names}
    if request.format == FORMAT_JSON:
        body = {"outputs": {name: _json_list(a) for name, a in arrays.items()}}
        return EncodedResponse(_dumps(body), JSON_CONTENT_TYPE)
    if request.format == FORMAT_V2:
        response: dict[str, Any] = {}
        if (request.request_id or request_id) is not None:
            response["id"] = request.request_id or request_id
        response["model_name"] = model_name
        if model_version is not None:
            response["model_version"] = model_version
        response["outputs"] = [
            {
                "name": name,
                "datatype": NUMPY_TO_V2[a.dtype.name],
                "shape": list(a.shape),
                "data": _json_list(a.reshape(-1)),
            }
            for name, a in arrays.items()
        ]
        return EncodedResponse(_dumps(response), JSON_CONTENT_TYPE)
    ((name, array),) = arrays.items()
    array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
    tensor_headers = {
        "X-Tensor-Name": name,
        "X-Tensor-Shape": ",".join(map(str, array.shape)),
        "X-Tensor-Dtype": array.dtype.name,
    }
    if request.format == FORMAT_RAW:
        return EncodedResponse(array.tobytes(), RAW_CONTENT_TYPE, tensor_headers)
    if request.format == FORMAT_NPY:
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array, allow_pickle=False)
        return EncodedResponse(buffer.getvalue(), NPY_CONTENT_TYPE, tensor_headers)
    raise ValueError(f"unknown request format {request.format!r}")


def encode_error(err: RequestError, request_format: str | None = None) -> EncodedResponse:
    """A client error as JSON; KServe v2 requests get the protocol's ``{"error": message}``."""
    request_format = request_format or err.request_format
    if request_format == FORMAT_V2:
        body: dict[str, Any] = {"error": err.message}
    else:
        body = {
            "code": err.status,
            "type": _ERROR_TYPES.get(err.status, "RequestError"),
            "message": err.message,
        }
    return EncodedResponse(_dumps(body), JSON_CONTENT_TYPE, {}, err.status)


def _response_names(outputs, request: DecodedRequest, output_specs) -> list[str]:
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
    if request.format in (FORMAT_RAW, FORMAT_NPY) and len(names) != 1:
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


def _json_list(array: np.ndarray) -> Any:
    """Nested lists; NaN/inf become null because standard JSON has no token for them."""
    if all_finite(array):
        return array.tolist()
    as_objects = array.astype(object)
    as_objects[~np.isfinite(array)] = None
    return as_objects.tolist()


def _dumps(document: Any) -> str:
    return json.dumps(document, separators=(",", ":"), allow_nan=False)
